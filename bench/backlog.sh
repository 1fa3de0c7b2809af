#!/usr/bin/env bash
# Restart with a backlog (issue 14). Builds the release binary and, for each backlog size,
# fills a fresh spool with that many pending events for an HTTP sink that is down (its URL is
# a closed local port), stops the daemon cleanly, and restarts it three times, measuring:
#
# - restart → ready: from the exec of the daemon to the first `GET /readyz` answered 200
#   (polled with curl every ~10 ms; median of the three restarts);
# - spool bytes per pending event: the size of spool.redb / pending (event, sink) pairs (and
#   the blocks the file really takes: redb grows it in steps, sparse until written);
# - record bytes per event: the event records alone (`spool check`: event JSON + raw body);
# - body bytes per event: the mean size of the bodies the fill posted (bench/backlog.lua);
# - amplification: spool bytes per event / body bytes per event;
# - RSS after ready (VmRSS of the daemon once /readyz is 200; median of the three).
#
# The fill goes through the daemon's HTTP API with wrk (bench/backlog.lua: distinct Webio
# payloads of the four shapes of bench/webio.lua, a valid token), the way a backlog really
# builds up: no shortcut through the library.
#
# Usage: bench/backlog.sh [SIZES...]        e.g. bench/backlog.sh 100000 1000000
#   BACKLOG_EVENTS   the sizes when none are given (default "100000 1000000")
#   WRK_THREADS / WRK_CONNECTIONS  the fill's load (default 2 / 32)
#   BACKLOG_KEEP=1   keep the temp dirs (their paths are printed)
#   BENCH_BIN        a release binary to measure instead of building this checkout's (e.g. the
#                    previous build, for a side-by-side comparison)
# Not a test: nothing here asserts a number.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || read -r -a sizes <<<"${BACKLOG_EVENTS:-100000 1000000}"
threads="${WRK_THREADS:-2}"
conns="${WRK_CONNECTIONS:-32}"

for tool in curl python3; do
  command -v "$tool" >/dev/null || { echo "$tool is needed" >&2; exit 1; }
done
if ! command -v wrk >/dev/null; then
  echo "wrk not found; installing it (Debian package)" >&2
  if [ "$(id -u)" = 0 ]; then apt-get install -y wrk >&2 || { apt-get update >&2 && apt-get install -y wrk >&2; }
  else sudo apt-get install -y wrk >&2; fi
fi

if [ -n "${BENCH_BIN:-}" ]; then
  bin="$BENCH_BIN"
else
  cargo build --release --quiet --manifest-path "$root/Cargo.toml"
  bin="${CARGO_TARGET_DIR:-$root/target}/release/webio-router"
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
median() { sort -g | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

dirs=()
pid=""
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  if [ "${BACKLOG_KEEP:-0}" = 1 ]; then printf 'kept: %s\n' "${dirs[@]}" >&2; else rm -rf "${dirs[@]}"; fi
}
trap cleanup EXIT

# Writes the configuration for a fresh run into $1.
configure() {
  local dir=$1 dead
  hook_port=$(free_port); admin_port=$(free_port); dead=$(free_port)
  cat > "$dir/routes.toml" <<TOML
[sinks.crm]
type = "http"
url = "http://127.0.0.1:$dead/down"
timeout = "1s"

[[routes]]
name = "everything"
to = ["crm"]
TOML
  cat > "$dir/webio-router.toml" <<TOML
routes_file = "$dir/routes.toml"
[server]
listen = "127.0.0.1:$hook_port"
[admin]
listen = "127.0.0.1:$admin_port"
[auth]
secrets = ["bench-secret-bench-secret-bench-secret-0123"]
[delivery]
mode = "spool"
spool_dir = "$dir/spool"
dead_letter_file = "$dir/dead-letter.jsonl"
# Room for a million events, and no event given up on while the sink is down: the whole
# backlog stays pending (the defaults would dead-letter the oldest after 20 attempts).
max_spool_bytes = 17179869184
max_attempts = 100000
retry_initial = "1s"
retry_max = "60s"
[log]
format = "json"
level = "warn,webio_router::app=info,webio_router::delivery=info"
TOML
}

start() { # starts the daemon; sets pid and t_start
  t_start=$(now)
  "$bin" --config "$dir/webio-router.toml" 2>>"$dir/router.log" &
  pid=$!
}

wait_ready() { # polls /readyz until 200; prints the seconds since t_start
  local limit=$((${1:-600} * 100)) i=0
  until curl -fs -o /dev/null "http://127.0.0.1:$admin_port/readyz" 2>/dev/null; do
    kill -0 "$pid" 2>/dev/null || { echo "the daemon exited:" >&2; tail -5 "$dir/router.log" >&2; exit 1; }
    i=$((i + 1)); [ "$i" -lt "$limit" ] || { echo "not ready after ${1:-600} s" >&2; exit 1; }
    sleep 0.01
  done
  awk -v a="$t_start" -v b="$(now)" 'BEGIN { printf "%.3f\n", b - a }'
}

stop() { # SIGTERM and wait: a clean stop
  kill -TERM "$pid"; wait "$pid" || true; pid=""
}

pending() { # (event, sink) pairs pending, from /metrics
  curl -fsS "http://127.0.0.1:$admin_port/metrics" |
    awk '$1 ~ /^webio_router_spool_pending({|$)/ { s += $NF } END { printf "%.0f\n", s }'
}

load="$(cut -d' ' -f1-3 /proc/loadavg)"
echo "restart-with-a-backlog benchmark: $(nproc) cores, load average $load at the start, $(uname -r)"
echo "fill: wrk -t$threads -c$conns through POST /webhooks/webio (distinct payloads); sink: http, down (closed port)"
echo

rows=()
for n in "${sizes[@]}"; do
  dir="$(mktemp -d "${TMPDIR:-/var/tmp}/webio-backlog-bench.XXXXXX")"
  dirs+=("$dir")
  configure "$dir"
  export WEBIO_TOKEN WEBIO_COUNT=$n WEBIO_THREADS=$threads WEBIO_RUN=$n
  WEBIO_TOKEN="$("$bin" --config "$dir/webio-router.toml" token --ttl 0)"
  start
  wait_ready 60 >/dev/null
  t0=$(now)
  # wrk's threads stop once their share is answered, but wrk itself waits out -d: once the
  # spool holds the whole fill (or stops growing for 10 s), SIGINT makes it report and exit.
  wrk -t"$threads" -c"$conns" -d3600s -s "$root/bench/backlog.lua" "http://127.0.0.1:$hook_port/webhooks/webio" >"$dir/wrk.out" &
  wrk_pid=$!
  last=-1; still=0
  while kill -0 "$wrk_pid" 2>/dev/null; do
    sleep 1
    p=$(pending)
    if [ "$p" -ge "$n" ]; then break; fi
    if [ "$p" = "$last" ]; then still=$((still + 1)); [ "$still" -lt 10 ] || break; else still=0; fi
    last=$p
  done
  kill -INT "$wrk_pid" 2>/dev/null || true
  wait "$wrk_pid" || true
  fill="$(grep '^WEBIO_BACKLOG' "$dir/wrk.out")"
  fill_s=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
  body="$(sed -E 's/.*mean_body=([0-9.]+).*/\1/' <<<"$fill")"
  echo "fill of $n: $fill ($fill_s s wall)" >&2
  stop
  size=$(stat -c %s "$dir/spool/spool.redb")
  # The event records alone (event JSON + raw body + header and checksum), from `spool check`.
  records=$("$bin" --config "$dir/webio-router.toml" spool check 2>/dev/null | sed -nE 's/.*events, ([0-9]+) bytes of event data.*/\1/p' || true)
  alloc=$(( $(stat -c %b "$dir/spool/spool.redb") * $(stat -c %B "$dir/spool/spool.redb") ))

  readies=(); rsses=(); held=0
  for _ in 1 2 3; do
    start
    readies+=("$(wait_ready 600)")
    rsses+=("$(rss_kib "$pid")")
    held=$(pending)
    stop
  done
  size_after=$(stat -c %s "$dir/spool/spool.redb")
  ready=$(printf '%s\n' "${readies[@]}" | median)
  rss=$(printf '%s\n' "${rsses[@]}" | median)
  spans="$(printf '%s ' "${readies[@]}")"
  rows+=("$(awk -v n="$n" -v p="$held" -v sz="$size" -v al="$alloc" -v rec="${records:-0}" -v body="$body" -v r="$ready" -v rs="$spans" -v rss="$rss" -v fs="$fill_s" 'BEGIN {
    per = (p > 0 ? sz / p : 0)
    printf "| %d | %d | %.2f s (%s) | %.0f MB (%.0f MB allocated) | %.0f (%.0f) | %.0f | %.0f | %.2f× (%.2f×) | %.1f MiB | %.0f s |",
      n, p, r, rs, sz / 1e6, al / 1e6, per, (p > 0 ? al / p : 0), (p > 0 ? rec / p : 0), body, (body > 0 ? per / body : 0),
      (body > 0 && p > 0 ? al / p / body : 0), rss / 1024, fs }')")
  [ "$size_after" = "$size" ] || echo "note: spool.redb grew from $size to $size_after bytes across the restarts" >&2
  [ "${BACKLOG_KEEP:-0}" = 1 ] || rm -rf "$dir/spool"
done

echo "| events posted | pending at restart | restart → ready (median of 3; each) | spool.redb size | spool bytes / event (allocated) | record bytes / event | body bytes / event | amplification (allocated) | RSS after ready | fill time |"
echo "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
printf '%s\n' "${rows[@]}"
echo
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "aims (issue 14): ready < 1 s with 1,000,000 pending; amplification < 1.5×"
