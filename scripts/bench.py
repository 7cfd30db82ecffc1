"""bench.py [FILTER | =NAME | --list]: CPython's side of make bench.

The same workloads as scripts/bench.lua, with CPython's multiprocessing
(fork start method), one JSON line per workload.  Run it with Debian's
/usr/bin/python3, the CPython users get from their distribution.
"""
import gc
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


# ---- process and pipe (issue 4) --------------------------------------------

def _nothing():
    pass


@workload("process.start_join", "procs/s")
def _start_join():
    def run(n):
        for _ in range(n):
            p = mp.Process(target=_nothing)
            p.start()
            p.join()
    return timed(run, 20, 1.0)


def _echo(conn):
    while True:
        v = conn.recv()
        if v is None:
            break
        conn.send(v)


@workload("pipe.pingpong", "roundtrips/s")
def _pingpong():
    a, b = mp.Pipe()
    p = mp.Process(target=_echo, args=(b,))
    p.start()
    b.close()

    def run(n):
        for i in range(n):
            a.send(i)
            a.recv()
    r = timed(run, 1000, 1.0)
    a.send(None)
    p.join()
    a.close()
    return r


def _sink(conn):
    while True:
        s = conn.recv_bytes()
        if s == b"":
            conn.send_bytes(b"k")
        elif s == b"q":
            break


@workload("pipe.stream_1mib", "MiB/s")
def _stream():
    a, b = mp.Pipe()
    chunk = b"x" * (1 << 20)
    p = mp.Process(target=_sink, args=(b,))
    p.start()
    b.close()

    def run(n):
        for _ in range(n):
            a.send_bytes(chunk)
        a.send_bytes(b"")
        a.recv_bytes()
    r = timed(run, 64, 1.0)
    a.send_bytes(b"q")
    p.join()
    a.close()
    return r


# ---- codec: CPython's msgpack (C extension) on the same values -------------
try:
    import msgpack
except ImportError:
    msgpack = None

RECORD = {"id": 12345, "name": "abcdefgh", "vals": [1.5, 2.5, 3.5, 4.5],
          "tags": ["x", "y", "z"], "ok": True}


def _deep(levels):
    root = {"level": 0, "name": "node"}
    node = root
    for i in range(1, levels + 1):
        node["child"] = {"level": i, "name": "node", "tags": ["a", "b"]}
        node = node["child"]
    return root


def _codec_pair(prefix, make, unit, items, min_n):
    # make() builds the value when the workload runs (big values built at
    # load time would slow down the fork workloads)
    cache = []

    def value():
        if not cache:
            v = make()
            cache.extend([v, msgpack.packb(v)])
        return cache

    def enc():
        v = value()[0]
        return timed(lambda n: [msgpack.packb(v) for _ in range(n)], min_n)

    def dec():
        s = value()[1]
        return timed(lambda n: [msgpack.unpackb(s, strict_map_key=False)
                                for _ in range(n)], min_n)
    W.append((prefix + ".encode", unit, lambda: _scaled(enc, items)))
    W.append((prefix + ".decode", unit, lambda: _scaled(dec, items)))


def _scaled(f, items):
    n, dt = f()
    return n * items, dt


if msgpack is not None:
    for name, v, unit, items, min_n in [
            ("record", lambda: RECORD, "objects/s", 1, 1000),
            ("floats1e6", lambda: [i + 0.25 for i in range(1, 1000001)], "Mitems/s", 1, 1),
            ("ints1e6", lambda: [i * 7 for i in range(1, 1000001)], "Mitems/s", 1, 1),
            ("map1e5", lambda: {"key%d" % i: i for i in range(1, 100001)}, "Mitems/s", 0.1, 1),
            ("deep200", lambda: _deep(200), "trees/s", 1, 10)]:
        _codec_pair("codec." + name, v, unit, items, min_n)


# ---- manager (issue 7) ------------------------------------------------------
# Loops run in child processes, timed there, 2*10^4 operations.  CPython's
# atomic increment is a manager Lock around get and set.
MGR_N = 20000


def _mgr_child(body, obj, n, conn):
    conn.recv()
    t0 = time.perf_counter()
    body(obj, n)
    conn.send(time.perf_counter() - t0)


def _manager_work(setup, body, procs=1):
    def run():
        with mp.Manager() as m:
            obj = setup(m)
            a, b = mp.Pipe()
            ps = [mp.Process(target=_mgr_child, args=(body, obj, MGR_N // procs, b))
                  for _ in range(procs)]
            for p in ps:
                p.start()
            for _ in ps:
                a.send("go")
            dt = max(a.recv() for _ in ps)
            for p in ps:
                p.join()
        return MGR_N, dt
    return run


def _dict_set(d, n):
    for i in range(1, n + 1):
        d[i] = i


def _dict_set_locked_setup(m):
    return (m.dict(), mp.Lock())


def _dict_set_locked(obj, n):
    d, lock = obj
    for i in range(1, n + 1):
        with lock:
            d[i] = i


def _dict_get_setup(m):
    d = m.dict()
    for i in range(1, 101):
        d[i] = i
    return d


def _dict_get(d, n):
    for i in range(1, n + 1):
        d[i % 100 + 1]


def _list_append(l, n):
    for i in range(1, n + 1):
        l.append(i)


def _incr_setup(m):
    return (m.dict(n=0), m.Lock())


def _incr(obj, n):
    d, lock = obj
    for _ in range(n):
        with lock:
            d["n"] = d["n"] + 1


W.append(("manager.dict_set", "ops/s", _manager_work(lambda m: m.dict(), _dict_set)))
W.append(("manager.dict_set_locked", "ops/s",
          _manager_work(_dict_set_locked_setup, _dict_set_locked)))
W.append(("manager.dict_get", "ops/s", _manager_work(_dict_get_setup, _dict_get)))
W.append(("manager.list_append", "ops/s", _manager_work(lambda m: m.list(), _list_append)))
W.append(("manager.apply_2procs", "ops/s", _manager_work(_incr_setup, _incr, 2)))
# ---- pool (issue 6) ---------------------------------------------------------

def _double(x):
    return x * 2


def _pool_map(workers, n):
    def run():
        xs = list(range(1, n + 1))
        t0 = time.perf_counter()
        with mp.Pool(workers) as pool:
            r = pool.map(_double, xs)
            pool.close()
            pool.join()
        dt = time.perf_counter() - t0
        assert r[-1] == 2 * n
        return n, dt
    return run


W.append(("pool.map_default", "tasks/s", _pool_map(None, 200000)))


@workload("pool.map_chunksize1", "tasks/s")
def _pool_map_cs1():
    with mp.Pool() as pool:
        xs = list(range(1, 20001))
        t0 = time.perf_counter()
        r = pool.map(_double, xs, 1)
        dt = time.perf_counter() - t0
        assert r[-1] == 40000
    return 20000, dt


@workload("pool.apply_async", "tasks/s")
def _pool_apply_async():
    with mp.Pool() as pool:
        t0 = time.perf_counter()
        rs = [pool.apply_async(_double, (i,)) for i in range(1, 20001)]
        for i, r in enumerate(rs, 1):
            assert r.get() == 2 * i
        dt = time.perf_counter() - t0
    return 20000, dt


def _spin(k):
    x = 0
    for i in range(1, k + 1):
        x += i % 7
    return x


@workload("pool.cpu_speedup_2w", "x")
def _pool_speedup():
    k = 1
    while True:
        k *= 2
        t0 = time.perf_counter()
        _spin(k)
        if time.perf_counter() - t0 > 0.06:
            break
    ratios = []
    for _ in range(5):
        t = {}
        for w in (1, 2):
            with mp.Pool(w) as pool:
                pool.map(_spin, [1, 1])
                t0 = time.perf_counter()
                pool.map(_spin, [k] * 8, 1)
                t[w] = time.perf_counter() - t0
        ratios.append(t[1] / t[2])
    ratios.sort()
    return ratios[2], 1


def _uss_kib(pid):
    kib = 0
    with open("/proc/%d/smaps_rollup" % pid) as f:
        for line in f:
            if line.startswith("Private_"):
                kib += int(line.split()[1])
    return kib


@workload("pool.idle_worker_uss", "KiB")
def _pool_uss():
    with mp.Pool(2) as pool:
        pool.map(_double, range(1000), 1)
        time.sleep(0.2)
        kibs = [_uss_kib(p.pid) for p in pool._pool]
    return sum(kibs) / len(kibs), 1


for _w in (1, 2, 4, 8, 16, 32, 64):
    W.append(("pool.scale_%d" % _w, "tasks/s", _pool_map(_w, 100000)))


# ---- futures (issue 15) -----------------------------------------------------

def _executor():
    import concurrent.futures
    return concurrent.futures.ProcessPoolExecutor(
        mp_context=mp.get_context("fork"))


# (a true round trip, as bench.lua's: each submit waits for its result)
@workload("futures.submit_result_rtt", "roundtrips/s")
def _futures_rtt():
    with _executor() as ex:
        ex.submit(_double, 0).result()

        def run(n):
            for i in range(n):
                assert ex.submit(_double, i).result() == 2 * i
        return timed(run, 100)


@workload("futures.submit_2e4", "tasks/s")
def _futures_2e4():
    with _executor() as ex:
        ex.submit(_double, 0).result()
        t0 = time.perf_counter()
        fs = [ex.submit(_double, i) for i in range(1, 20001)]
        for i, f in enumerate(fs, 1):
            assert f.result() == 2 * i
        dt = time.perf_counter() - t0
    return 20000, dt


# ---- queues, locks, shared values (issue 5) ---------------------------------

SMALL = {"id": 1, "name": "abc", "vals": [1.5, 2.5, 3.5]}


def _produce(q, n, item):
    if item is None:
        for i in range(n):
            q.put(i)
    else:
        for _ in range(n):
            q.put(item)


def _queue_run(n, producers, item=None):
    q = mp.Queue()
    per = n // producers
    ps = [mp.Process(target=_produce, args=(q, per, item)) for _ in range(producers)]
    for p in ps:
        p.start()
    for _ in range(per * producers):
        q.get()
    for p in ps:
        p.join()
    q.close()
    q.join_thread()


@workload("queue.ints_1to1", "items/s")
def _q_ints():
    return timed(lambda n: _queue_run(n, 1), 20000, 1.0)


@workload("queue.table_1to1", "items/s")
def _q_table():
    return timed(lambda n: _queue_run(n, 1, SMALL), 20000, 1.0)


@workload("queue.ints_4to1", "items/s")
def _q_4to1():
    return timed(lambda n: _queue_run(n, 4), 20000, 1.0)


@workload("queue.1mib_1to1", "items/s")
def _q_1mib():
    item = b"x" * 2**20
    return timed(lambda n: _queue_run(n, 1, item), 64, 1.0)


def _locked_add(v, n):
    for _ in range(n):
        with v.get_lock():
            v.value += 1


@workload("value.locked_add_2procs", "ops/s")
def _value_add():
    def run(n):
        v = mp.Value("i", 0)
        per = n // 2
        p = mp.Process(target=_locked_add, args=(v, per))
        p.start()
        _locked_add(v, per)
        p.join()
        assert v.value == 2 * per
    return timed(run, 20000, 1.0)


@workload("lock.pairs_uncontended", "pairs/s")
def _lock_pairs():
    lock = mp.Lock()

    def run(n):
        for _ in range(n):
            lock.acquire()
            lock.release()
    return timed(run, 100000)


def _mem_kib():
    kib = 0
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                kib += int(line.split()[1])
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmPTE:"):
                kib += int(line.split()[1])
    return kib


@workload("queue.empty_memory", "queues/MiB")
def _q_memory():
    import gc
    gc.collect()
    before = _mem_kib()
    qs = []
    for i in range(1000):
        q = mp.Queue()
        q.put(i)          # used once (starts the feeder thread), then empty
        q.get()
        qs.append(q)
    gc.collect()
    kib = max(_mem_kib() - before, 1)
    for q in qs:
        q.close()
        q.join_thread()
    return 1000, kib / 1024


if __name__ == "__main__":
    mp.set_start_method("fork")
    for name, unit, fn in W:
        if FILTER == "--list":
            print(name)
            continue
        if FILTER and FILTER.startswith("="):
            if name != FILTER[1:]:
                continue
        elif FILTER and FILTER not in name:
            continue
        gc.collect()
        count, secs = fn()
        print(json.dumps({"name": name, "seconds": secs, "rate": count / secs,
                          "unit": unit}), flush=True)
