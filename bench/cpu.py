#!/usr/bin/env python3
"""CPU and scheduling per request, side by side (issue 14, "Request path, fourth round").

Runs the given setups in turn, ROUNDS times (a, b, c, a, b, c, ...), each one a fresh server
under `wrk -t2 -c32` with bench/webio.lua's distinct payloads, and prints per run and as medians:
requests/s, the ratio to the last `bare` run before it, p50/p99, the server's CPU per request
(every thread's /proc/PID/task/*/schedstat, time on the CPU) split into user and system time,
wrk's own CPU per request, and the server's tokio workers' voluntary/involuntary context switches
and run-queue wait per request. CPU per request moves far less than requests/s on a shared machine.

Usage: bench/cpu.py ROUNDS DURATION SETUP...
  SETUP = label|kind|binary[|VAR=value,VAR=value]   (environment for that server only)
  kind  = bare (examples/bare.rs) | unrouted (the router, one route matching nothing) |
          direct-os (direct mode, file sink with fsync = false) | direct (file sink, fsync)
Example:
  bench/cpu.py 5 5s "bare|bare|target/release/examples/bare" \\
      "old|unrouted|/path/to/old/webio-router" "new|unrouted|target/release/webio-router"
Environment: BENCH_PORT (19100; uses 2 ports), CPU_PERF=SECONDS: also count syscalls and
scheduler events per request with `perf stat` (server and wrk) for that long in each run.
"""
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "bench-secret-0123456789-0123456789-0123456789"
TICK = os.sysconf("SC_CLK_TCK")
PERF_EVENTS = [f"syscalls:sys_enter_{s}" for s in ("epoll_wait", "recvfrom", "read", "write", "writev", "futex")] + [
    "sched:sched_switch",
    "sched:sched_wakeup",
]


def wait_port(port, timeout=20.0):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return True
        except OSError:
            time.sleep(0.01)
    return False


def threads(pid):
    """Per thread: name, CPU ns, run-queue wait ns, voluntary, involuntary switches, utime, stime."""
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            base = f"/proc/{pid}/task/{t}"
            comm = open(f"{base}/comm").read().strip()
            ss = open(f"{base}/schedstat").read().split()
            st = open(f"{base}/status").read()
            sf = open(f"{base}/stat").read().rsplit(")", 1)[1].split()
            vol = int(re.search(r"\nvoluntary_ctxt_switches:\s+(\d+)", st).group(1))
            nvol = int(re.search(r"nonvoluntary_ctxt_switches:\s+(\d+)", st).group(1))
            out[t] = (comm, int(ss[0]), int(ss[1]), vol, nvol, int(sf[11]), int(sf[12]))
        except (OSError, AttributeError):
            pass
    return out


def start(kind, binary, port, env, work):
    if kind == "bare":
        return subprocess.Popen([binary, f"127.0.0.1:{port}", "202"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=env), "unused"
    sink = f'type = "file"\npath = "{work}/events.jsonl"\n' + ("fsync = false\n" if kind == "direct-os" else "")
    when = 'when = { type = "no-such-type" }\n' if kind == "unrouted" else ""
    with open(f"{work}/routes.toml", "w") as f:
        f.write(f'[sinks.out]\n{sink}\n[[routes]]\nname = "everything"\n{when}to = ["out"]\n')
    with open(f"{work}/webio-router.toml", "w") as f:
        f.write(f'routes_file = "{work}/routes.toml"\n[server]\nlisten = "127.0.0.1:{port}"\n'
                f'path = "/webhooks/webio"\n[admin]\nlisten = "127.0.0.1:{port + 1}"\n[auth]\n'
                f'secrets = ["{SECRET}"]\n[delivery]\nmode = "direct"\nspool_dir = "{work}/spool"\n'
                f'dead_letter_file = "{work}/dead-letter.jsonl"\nshutdown_timeout = "2s"\n[log]\nlevel = "info"\n')
    cfg = f"{work}/webio-router.toml"
    token = subprocess.check_output([binary, "--config", cfg, "token", "--ttl", "0", "--org", "1234"], env=env).decode().strip()
    log = open(f"{work}/router.log", "w")
    return subprocess.Popen([binary, "--config", cfg, "serve"], stdout=log, stderr=subprocess.STDOUT, env=env), token


def perf_counts(pid, seconds):
    p = subprocess.run(["perf", "stat", "-x", ",", "-e", ",".join(PERF_EVENTS), "-p", str(pid), "--", "sleep", seconds],
                       capture_output=True, text=True)
    counts = {}
    for line in p.stderr.splitlines():
        f = line.split(",")
        if len(f) > 2 and f[0].strip().isdigit():
            counts[f[2].split(":")[-1].replace("sys_enter_", "")] = int(f[0])
    return counts


def one_run(kind, binary, port, duration, extra_env):
    env = dict(os.environ)
    env.update(extra_env)
    work = tempfile.mkdtemp(prefix="webio-cpu.")
    proc, token = start(kind, binary, port, env, work)
    try:
        if not wait_port(port) or (kind != "bare" and not wait_port(port + 1)):
            raise RuntimeError(f"{binary} did not start (see {work})")
        time.sleep(0.5)
        before = threads(proc.pid)
        wrk = subprocess.Popen(["wrk", "-t2", "-c32", f"-d{duration}", "--latency", "-s", f"{ROOT}/bench/webio.lua",
                                f"http://127.0.0.1:{port}/webhooks/webio"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, env=dict(os.environ, WEBIO_TOKEN=token, WEBIO_RATE=""))
        perf = {}
        if os.environ.get("CPU_PERF"):
            time.sleep(2)
            with ThreadPoolExecutor(2) as pool:  # both at once, within wrk's run
                counts = pool.map(lambda pid: perf_counts(pid, os.environ["CPU_PERF"]), (proc.pid, wrk.pid))
                for who, c in zip(("srv", "wrk"), counts):
                    perf.update({f"{who}:{k}": v for k, v in c.items()})
        out = wrk.stdout.read().decode()
        # wrk's own CPU, from its exit status (exact, unlike /proc's clock ticks).
        _, _, usage = os.wait4(wrk.pid, 0)
        wrk.returncode = 0
        wrk_cpu = (usage.ru_utime, usage.ru_stime)
        after = threads(proc.pid)
        hwm = re.search(r"VmHWM:\s+(\d+)", open(f"/proc/{proc.pid}/status").read()).group(1)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        subprocess.run(["rm", "-rf", work])
    m = re.search(r"WEBIO_BENCH (.*)", out)
    if not m:
        raise RuntimeError(out)
    b = dict(kv.split("=") for kv in m.group(1).split())
    n = int(b["requests"])
    total = [0] * 6
    worker = [0] * 4
    for t, v in after.items():
        a = before.get(t, (v[0], 0, 0, 0, 0, 0, 0))
        d = [v[k] - a[k] for k in range(1, 7)]
        total = [x + y for x, y in zip(total, d)]
        if v[0].startswith("tokio-rt-worker"):
            worker = [worker[0] + d[1], worker[1] + d[2], worker[2] + d[3], worker[3] + 1]
    per_writev = perf.get("srv:writev") or 0
    return {
        "rps": float(b["rps"]), "p50_us": int(b["p50_us"]), "p99_us": int(b["p99_us"]),
        "errors": int(b["non2xx"]) + int(b["sockerr"]),
        "cpu_us": total[0] / n / 1000, "user_us": total[4] * 1e6 / TICK / n, "sys_us": total[5] * 1e6 / TICK / n,
        "wrk_us": sum(wrk_cpu) * 1e6 / n,
        "workers": worker[3], "wait_us": worker[0] / n / 1000, "vol": worker[1] / n, "nvol": worker[2] / n,
        "peak_kib": int(hwm), "threads": len(after),
        # Per response: the server writes one per request (writev), so it counts the requests
        # in the perf window.
        "perf": {k: round(v / per_writev, 3) for k, v in perf.items()} if per_writev else {},
    }


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    rounds, duration = int(sys.argv[1]), sys.argv[2]
    setups = []
    for s in sys.argv[3:]:
        label, kind, binary, *rest = s.split("|")
        env = dict(kv.split("=", 1) for kv in rest[0].split(",") if kv) if rest else {}
        setups.append((label, kind, binary, env))
    port = int(os.environ.get("BENCH_PORT", "19100"))
    print(f"load average before: {open('/proc/loadavg').read().strip()}", flush=True)
    results = {s[0]: [] for s in setups}
    last_bare = None
    for i in range(rounds):
        for label, kind, binary, env in setups:
            r = one_run(kind, binary, port, duration, env)
            if kind == "bare":
                last_bare = r["rps"]
            r["ratio"] = r["rps"] / last_bare if last_bare and kind != "bare" else 1.0
            results[label].append(r)
            print(f"{i} {label:12} {r['rps']:8.0f} req/s ratio {r['ratio']:.2f} p50 {r['p50_us']} µs p99 {r['p99_us']} µs "
                  f"| server {r['cpu_us']:.2f} µs/req (user {r['user_us']:.2f} sys {r['sys_us']:.2f}) wrk {r['wrk_us']:.2f} "
                  f"| {r['workers']} workers: vol {r['vol']:.3f} nvol {r['nvol']:.3f} wait {r['wait_us']:.2f} µs/req "
                  f"| peak {r['peak_kib']} KiB errors {r['errors']}"
                  + (f" | perf/req {json.dumps(r['perf'])}" if r["perf"] else ""), flush=True)
    print(f"load average after: {open('/proc/loadavg').read().strip()}")
    for label, rs in results.items():
        med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
        print(f"median {label:12} {med('rps'):8.0f} req/s ratio {med('ratio'):.2f} p50 {med('p50_us'):.0f} µs "
              f"server {med('cpu_us'):.2f} µs/req wrk {med('wrk_us'):.2f} µs/req "
              f"(every run: {' '.join(str(round(r['rps'])) for r in rs)})")


if __name__ == "__main__":
    main()
