"""bench.py [FILTER]: CPython's side of make bench.

The same workloads as scripts/bench.lua, with CPython's multiprocessing
(fork start method), one JSON line per workload.  Run it with Debian's
/usr/bin/python3, the CPython users get from their distribution.
"""
import json
import multiprocessing as mp
import sys
import time

FILTER = sys.argv[1] if len(sys.argv) > 1 else None
W = []


def workload(name, unit):
    def deco(fn):
        W.append((name, unit, fn))
        return fn
    return deco


def timed(f, n, min_secs=0.3):
    while True:
        t0 = time.perf_counter()
        f(n)
        dt = time.perf_counter() - t0
        if dt >= min_secs or n >= 1e9:
            return n, dt
        n = n * max(2, int(min_secs / max(dt, 1e-6) * 1.2) + 1)


@workload("require", "requires/s")
def _require():
    import importlib

    def run(n):
        for _ in range(n):
            for k in [k for k in sys.modules if k == "multiprocessing" or k.startswith("multiprocessing.")]:
                del sys.modules[k]
            importlib.import_module("multiprocessing")
    return timed(run, 10)


if __name__ == "__main__":
    mp.set_start_method("fork")
    for name, unit, fn in W:
        if FILTER and FILTER not in name:
            continue
        count, secs = fn()
        print(json.dumps({"name": name, "seconds": secs, "rate": count / secs,
                          "unit": unit}), flush=True)
