#!/usr/bin/env python3
"""Helpers of bench/soak.sh (standard library only, Python 3.8+).

  soak.py drive HOST:PORT PATH TOKEN RATE SECONDS WORKERS OUT_IDS
      The load: distinct signed webhooks at RATE per second for SECONDS, over WORKERS
      keep-alive connections. A webhook that is not answered 200/202 (daemon killed or
      restarting, connection cut, 503) is sent again, the same body, as Webio would, until
      it is answered or the retry grace after the load ends (30 s) runs out. Every id answered
      200/202 is appended to OUT_IDS as "id seq status". A JSON summary goes to stdout.

  soak.py sink PORT OUT_IDS FAIL_RATIO
      The HTTP sink: answers POSTs 200 after appending the x-webio-event-id header to OUT_IDS
      (flushed before the answer), or 503 to a random FAIL_RATIO of them.

  soak.py free PORT COUNT
      Exits 0 if the COUNT ports from PORT on 127.0.0.1 can all be bound by a listener (as
      the daemon and the sink bind them: SO_REUSEADDR), 1 if one of them is taken.

  soak.py ledger DRIVER_JSON ACCEPTED_IDS DEAD_LETTERS PENDING_JSON SINK=KIND:PATH...
      Compares the ids the daemon accepted with what each sink holds (KIND "file": JSON Lines
      files whose objects carry "id", PATH a glob; KIND "ids": one id per line) and the dead
      letters, prints the ledger and exits 1 if an accepted event is missing anywhere.
"""

import glob
import http.client
import json
import random
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RETRY_GRACE_S = 30.0

SHAPES = [
    '{{"type":"messageStatusUpdate","conversationId":"{conv}","communicationActionId":"{act}",'
    '"outboundChannelAddress":"447717472695","inboundChannelAddress":"WhatsApp QA Test",'
    '"customerUID":"","dateCreated":"2021-01-28 12:22:15.397","statusCode":"2"}}',
    '{{"type":"inboundMessage","conversationId":"{conv}","communicationActionId":"{act}",'
    '"outboundChannelAddress":"447717472695","inboundChannelAddress":"WhatsApp QA Test",'
    '"customerUID":"","body":"soak message {act}","dateCreated":"2021-01-28 12:21:28.373"}}',
    '{{"type":"messageStatusUpdate","conversationId":"{conv}","outboundChannelAddress":"447700900123",'
    '"inboundChannelAddress":"SMS Longcode","customerUID":"CUST-{act}",'
    '"dateCreated":"2020-11-03 09:15:40.005","statusCode":"1"}}',
    '{{"type":"conversationClosed","conversationId":"{conv}","closedBy":"agent-{act}",'
    '"dateCreated":"2025-05-19 16:40:00.000"}}',
]


def percentile(sorted_values, p):
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, int(round(p / 100.0 * (len(sorted_values) - 1))))
    return sorted_values[k]


def drive(argv):
    addr, path, token, rate, seconds, workers, out_path = argv
    host, port = addr.rsplit(":", 1)
    port, rate, seconds, workers = int(port), float(rate), float(seconds), int(workers)
    nonce = "%x" % (int(time.time() * 1000) & 0xFFFFFFFF)
    headers = {"x-webio-token": token, "content-type": "application/json"}
    out = open(out_path, "w", encoding="utf-8")
    lock = threading.Lock()
    stats = {
        "events": 0, "accepted": 0, "accepted_202": 0, "accepted_200": 0, "attempts": 0,
        "retried_events": 0, "not_accepted": 0, "conn_errors": 0, "status_503": 0,
        "unexpected": {}, "latencies": [],
    }
    start = time.monotonic()
    stop_at = start + seconds
    give_up_at = stop_at + RETRY_GRACE_S

    def worker(w):
        conn = None
        interval = workers / rate
        slot = start + w * interval / workers
        seq = w
        local = {"events": 0, "accepted_202": 0, "accepted_200": 0, "attempts": 0,
                 "retried_events": 0, "not_accepted": 0, "conn_errors": 0, "status_503": 0}
        lat = []
        while True:
            now = time.monotonic()
            if now >= stop_at:
                break
            # A fixed schedule; one that fell behind (daemon down) restarts from now: no burst.
            if slot < now - interval:
                slot = now
            if slot > now:
                time.sleep(slot - now)
            slot += interval
            conv = "%s%07d" % (nonce, seq)
            body = SHAPES[seq % len(SHAPES)].format(conv=conv, act="%s-%d" % (nonce, seq)).encode()
            local["events"] += 1
            tries = 0
            while True:
                tries += 1
                local["attempts"] += 1
                status, data = None, b""
                t0 = time.monotonic()
                try:
                    if conn is None:
                        conn = http.client.HTTPConnection(host, port, timeout=10)
                    conn.request("POST", path, body, headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    status = resp.status
                    if resp.will_close:
                        conn.close()
                        conn = None
                except (OSError, http.client.HTTPException):
                    local["conn_errors"] += 1
                    if conn is not None:
                        conn.close()
                    conn = None
                if status in (200, 202):
                    lat.append(time.monotonic() - t0)
                    eid = json.loads(data)["id"]
                    local["accepted_%d" % status] += 1
                    if tries > 1:
                        local["retried_events"] += 1
                    with lock:
                        out.write("%s %d %d\n" % (eid, seq, status))
                    break
                if status is not None and status != 503:
                    # 4xx or anything else for a valid signed webhook: a bug, reported.
                    with lock:
                        key = str(status)
                        stats["unexpected"][key] = stats["unexpected"].get(key, 0) + 1
                    local["not_accepted"] += 1
                    break
                if status == 503:
                    local["status_503"] += 1
                if time.monotonic() >= give_up_at:
                    local["not_accepted"] += 1
                    break
                time.sleep(min(0.02 * tries, 0.5))
            seq += workers
        if conn is not None:
            conn.close()
        with lock:
            for k, v in local.items():
                stats[k] += v
            stats["latencies"].extend(lat)

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    out.close()
    lat = sorted(stats.pop("latencies"))
    stats["accepted"] = stats["accepted_202"] + stats["accepted_200"]
    stats["seconds"] = round(elapsed, 1)
    stats["load_seconds"] = seconds
    stats["target_rate"] = rate
    stats["accepted_per_s"] = round(stats["accepted"] / seconds, 1) if seconds else 0
    stats["p50_ms"] = round(percentile(lat, 50) * 1000, 2)
    stats["p99_ms"] = round(percentile(lat, 99) * 1000, 2)
    stats["max_ms"] = round((lat[-1] if lat else 0) * 1000, 1)
    json.dump(stats, sys.stdout)
    sys.stdout.write("\n")


def sink(argv):
    port, out_path, fail_ratio = int(argv[0]), argv[1], float(argv[2])
    out = open(out_path, "a", encoding="utf-8")
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            n = int(self.headers.get("content-length") or 0)
            if n:
                self.rfile.read(n)
            eid = self.headers.get("x-webio-event-id", "")
            if random.random() < fail_ratio:
                status = 503
            else:
                status = 200
                with lock:
                    out.write(eid + "\n")
                    out.flush()
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        allow_reuse_address = True

    Server(("127.0.0.1", port), Handler).serve_forever()


def free(argv):
    import socket

    port, count = int(argv[0]), int(argv[1])
    for p in range(port, port + count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", p))
        except OSError:
            return 1
        finally:
            s.close()
    return 0


def ledger(argv):
    driver_json, accepted_path, dead_path, pending_json = argv[:4]
    sinks = []
    for spec in argv[4:]:
        name, rest = spec.split("=", 1)
        kind, path = rest.split(":", 1)
        sinks.append((name, kind, path))
    driver = json.load(open(driver_json, encoding="utf-8"))
    pending = json.load(open(pending_json, encoding="utf-8"))

    accepted = set()
    for line in open(accepted_path, encoding="utf-8"):
        parts = line.split()
        if parts:
            accepted.add(parts[0])

    dead = {name: set() for name, _, _ in sinks}
    dead_lines = damaged = 0
    try:
        for line in open(dead_path, encoding="utf-8"):
            if not line.strip():
                continue
            dead_lines += 1
            try:
                d = json.loads(line)
            except ValueError:
                damaged += 1
                continue
            if d.get("eventId") is None:
                damaged += 1
            dead.setdefault(d.get("sink"), set()).add(d.get("eventId"))
    except FileNotFoundError:
        pass

    print("requests: %d events sent (%d attempts), %d accepted: %d answered 202, %d answered 200 "
          "duplicate (a retry after a cut connection); %d events needed a retry; %d not accepted"
          % (driver["events"], driver["attempts"], driver["accepted"], driver["accepted_202"],
             driver["accepted_200"], driver["retried_events"], driver["not_accepted"]))
    print("          %.1f accepted/s (target %g/s over %g s); latency p50 %.2f ms, p99 %.2f ms, max %.1f ms; "
          "%d connection errors, %d answers 503%s"
          % (driver["accepted_per_s"], driver["target_rate"], driver["load_seconds"], driver["p50_ms"],
             driver["p99_ms"], driver["max_ms"], driver["conn_errors"], driver["status_503"],
             "".join("; %d answers %s (unexpected)" % (n, s) for s, n in sorted(driver["unexpected"].items()))))
    if len(accepted) != driver["accepted"]:
        print("          note: %d accepted answers carried %d distinct ids" % (driver["accepted"], len(accepted)))

    total_lost = 0
    missing_report = []
    for name, kind, path in sinks:
        seen, lines, bad = {}, 0, 0
        files = sorted(glob.glob(path))
        for f in files:
            for line in open(f, encoding="utf-8", errors="replace"):
                if not line.strip():
                    continue
                lines += 1
                if kind == "file":
                    try:
                        eid = json.loads(line)["id"]
                    except (ValueError, KeyError, TypeError):
                        bad += 1
                        continue
                else:
                    eid = line.strip()
                seen[eid] = seen.get(eid, 0) + 1
        delivered = accepted & seen.keys()
        dead_here = (accepted & dead.get(name, set())) - delivered
        missing = accepted - delivered - dead_here
        left = int(pending.get(name, 0))
        lost = max(0, len(missing) - left)
        total_lost += lost
        dups = sum(n - 1 for n in seen.values() if n > 1)
        unknown = len(seen.keys() - accepted)
        print("sink %-5s accepted %d = delivered %d + dead-lettered %d + pending %d%s; duplicates %d "
              "(%d lines, %d ids twice or more)%s%s"
              % (name, len(accepted), len(delivered), len(dead_here), left,
                 "" if lost == 0 else " + LOST %d" % lost, dups, lines,
                 sum(1 for n in seen.values() if n > 1),
                 "; %d lines unparsable" % bad if bad else "",
                 "; %d ids delivered that the driver never saw accepted" % unknown if unknown else ""))
        if lost:
            missing_report.append((name, sorted(missing)))
    print("dead letters: %d lines (%d without an event: damaged spool records)" % (dead_lines, damaged))
    for name, ids in missing_report:
        print("missing at %s (%d): %s%s" % (name, len(ids), " ".join(ids[:50]), " …" if len(ids) > 50 else ""))
    print("lost=%d" % total_lost)
    return 1 if total_lost else 0


def main():
    if len(sys.argv) < 2:
        sys.stderr.write(__doc__)
        return 2
    cmd, argv = sys.argv[1], sys.argv[2:]
    if cmd == "drive":
        drive(argv)
    elif cmd == "sink":
        sink(argv)
    elif cmd == "free":
        return free(argv)
    elif cmd == "ledger":
        return ledger(argv)
    else:
        sys.stderr.write(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
