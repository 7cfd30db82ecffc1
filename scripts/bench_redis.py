"""bench_redis.py --socket PATH [FILTER | =NAME | --list]: the references
for luamp's Redis rows in make bench -- Celery (Redis broker and result
backend, prefork pool of 2) and RQ (2 workers), on the Redis whose unix
socket is PATH (the one luamp's rows use in the same run).  One JSON line
per workload, as scripts/bench.py prints.  Run with Debian's
/usr/bin/python3 (python3-celery, python3-rq).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

SOCKET = None
FILTER = None
W = []

TASKS = """
from celery import Celery
import os
url = "redis+socket://" + os.environ["BENCH_REDIS_SOCKET"]
app = Celery("bench_tasks", broker=url, backend=url)
app.conf.update(result_expires=600, worker_prefetch_multiplier=64,
                task_acks_late=False, broker_connection_retry_on_startup=True)

@app.task
def inc(x):
    return x + 1

def rq_inc(x):
    return x + 1
"""


def workload(name, unit):
    def deco(fn):
        W.append((name, unit, fn))
        return fn
    return deco


class Workers:
    """Worker processes started for a workload, stopped after it."""

    def __init__(self, argv_list, cwd, env):
        self.procs = [subprocess.Popen(a, cwd=cwd, env=env,
                                       stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL,
                                       start_new_session=True)
                      for a in argv_list]

    def close(self):
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _setup():
    d = tempfile.mkdtemp(prefix="luamp-bench-celery-")
    with open(os.path.join(d, "bench_tasks.py"), "w") as f:
        f.write(TASKS)
    env = dict(os.environ, BENCH_REDIS_SOCKET=SOCKET, PYTHONPATH=d)
    sys.path.insert(0, d)
    os.environ["BENCH_REDIS_SOCKET"] = SOCKET
    return d, env


def _flush():
    import redis
    redis.Redis(unix_socket_path=SOCKET).flushdb()


def _celery(fn):
    d, env = _setup()
    _flush()
    import bench_tasks
    w = Workers([[sys.executable, "-m", "celery", "-A", "bench_tasks",
                  "worker", "-c", "2", "-P", "prefork", "-l", "ERROR",
                  "--without-heartbeat", "--without-gossip",
                  "--without-mingle"]], d, env)
    try:
        # wait until a worker serves
        deadline = time.time() + 60
        while True:
            try:
                bench_tasks.inc.delay(1).get(timeout=2)
                break
            except Exception:
                if time.time() > deadline:
                    raise
        return fn(bench_tasks)
    finally:
        w.close()
        shutil.rmtree(d, ignore_errors=True)


# (luamp's row submits 2e4 tasks; Celery's rate is flat in n and 2e4 of
# them take minutes, so its side submits 2e3)
@workload("redis.apply_async_2e4", "tasks/s")
def _celery_async():
    def run(t):
        n = 2000
        t0 = time.perf_counter()
        rs = [t.inc.delay(i) for i in range(n)]
        for i, r in enumerate(rs):
            assert r.get(timeout=600) == i + 1
        return n, time.perf_counter() - t0
    return _celery(run)


@workload("redis.apply_roundtrip", "round trips/s")
def _celery_rtt():
    def run(t):
        n = 100
        t0 = time.perf_counter()
        for i in range(n):
            assert t.inc.delay(i).get(timeout=60) == i + 1
        return n, time.perf_counter() - t0
    return _celery(run)


# (RQ forks a process per job: a few dozen jobs give its rate)
@workload("redis.rq_jobs", "jobs/s")
def _rq():
    d, env = _setup()
    _flush()
    import redis
    from rq import Queue
    import bench_tasks
    conn = redis.Redis(unix_socket_path=SOCKET)
    url = "unix://" + SOCKET
    w = Workers([[sys.executable, "-m", "rq.cli", "worker", "-u", url,
                  "-q", "bench"]] * 2, d, env)
    try:
        q = Queue("bench", connection=conn)
        n = 40
        t0 = time.perf_counter()
        jobs = [q.enqueue(bench_tasks.rq_inc, i) for i in range(n)]
        deadline = time.time() + 600
        for i, j in enumerate(jobs):
            while j.get_status(refresh=True) != "finished":
                if time.time() > deadline:
                    raise TimeoutError("rq")
                time.sleep(0.005)
            assert j.result == i + 1
        return n, time.perf_counter() - t0
    finally:
        w.close()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--socket"]:
        SOCKET = args[1]
        args = args[2:]
    FILTER = args[0] if args else None
    for name, unit, fn in W:
        if FILTER == "--list":
            print(name)
            continue
        if FILTER and FILTER.startswith("="):
            if name != FILTER[1:]:
                continue
        elif FILTER and FILTER not in name:
            continue
        count, secs = fn()
        print(json.dumps({"name": name, "seconds": secs, "rate": count / secs,
                          "unit": unit}), flush=True)
