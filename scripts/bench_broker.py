"""bench_broker.py [FILTER]: the references of luamp's broker workloads
(scripts/bench_broker.lua) -- Celery (Redis broker and result backend,
prefork -c 2) and RQ (two workers, which fork per job) -- each on its own
redis-server like luamp's (temp dir, unix socket, AOF with fsync every
second).  Prints one JSON line per workload, as bench.py.  Run with
Debian's /usr/bin/python3 (python3-celery, python3-rq).  Also the module
of the tasks: the workers import it by name."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from celery import Celery

SOCK = os.environ.get("LUAMP_BENCH_SOCK", "/nonexistent")
app = Celery("bench_broker", broker="redis+socket://" + SOCK,
             backend="redis+socket://" + SOCK)
app.conf.update(worker_prefetch_multiplier=4, task_acks_late=False,
                worker_hijack_root_logger=False)


@app.task
def add1(x):
    return x + 1


def rq_add1(x):
    return x + 1


def emit(name, count, secs, unit, filt):
    print(json.dumps({"name": name, "seconds": secs, "rate": count / secs,
                      "unit": unit}), flush=True)


def start_redis(d):
    sock = os.path.join(d, "redis.sock")
    p = subprocess.Popen(["redis-server", "--port", "0", "--unixsocket", sock,
                          "--dir", d, "--appendonly", "yes", "--save", "",
                          "--logfile", os.path.join(d, "log")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis
    for _ in range(200):
        try:
            redis.Redis(unix_socket_path=sock).ping()
            return p, sock
        except Exception:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def stop(procs):
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            pass
        p.wait()


def bench_celery(d, filt):
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, LUAMP_BENCH_SOCK=SOCK, PYTHONPATH=here)
    w = subprocess.Popen([sys.executable, "-m", "celery", "-A", "bench_broker",
                          "worker", "-c", "2", "--pool", "prefork",
                          "--loglevel", "ERROR"], env=env, cwd=here,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    try:
        add1.delay(1).get(timeout=60)             # the worker is up
        n = 2000
        t0 = time.time()
        rs = [add1.delay(i) for i in range(n)]
        for i, r in enumerate(rs):
            assert r.get(timeout=120) == i + 1
        emit("celery.apply_async", n, time.time() - t0, "tasks/s", filt)
        n = 20
        t0 = time.time()
        for _ in range(n):
            add1.delay(1).get(timeout=60)
        emit("celery.apply_rtt", n, time.time() - t0, "round trips/s", filt)
    finally:
        stop([w])


def bench_rq(d, filt):
    import redis
    from rq import Queue
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, LUAMP_BENCH_SOCK=SOCK, PYTHONPATH=here)
    ws = [subprocess.Popen(["rq", "worker", "--url", "unix://" + SOCK, "-q"],
                           env=env, cwd=here, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
          for _ in range(2)]
    try:
        q = Queue(connection=redis.Redis(unix_socket_path=SOCK))
        n = 20
        t0 = time.time()
        jobs = [q.enqueue("bench_broker.rq_add1", i) for i in range(n)]
        for i, j in enumerate(jobs):
            while j.get_status(refresh=True) != "finished":
                if time.time() - t0 > 300:
                    raise RuntimeError("rq jobs did not finish")
                time.sleep(0.005)
            assert j.result == i + 1
        emit("rq.apply_async", n, time.time() - t0, "tasks/s", filt)
    finally:
        stop(ws)


def main():
    global SOCK
    filt = sys.argv[1] if len(sys.argv) > 1 else None
    d = tempfile.mkdtemp(prefix="luamp-bench-redis.")
    server = None
    try:
        server, SOCK = start_redis(d)
        app.conf.broker_url = "redis+socket://" + SOCK
        app.conf.result_backend = "redis+socket://" + SOCK
        if not filt or "celery" in filt:
            bench_celery(d, filt)
        if not filt or "rq" in filt:
            bench_rq(d, filt)
    finally:
        if server:
            server.kill()
            server.wait()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
