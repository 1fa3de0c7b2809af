#!/usr/bin/env bash
# Spool-mode throughput under concurrent load (issue 4). Builds the release binary, runs the
# router in spool mode with a file sink in a temp dir, drives it with wrk (bench/spool.lua:
# distinct payloads, valid token) at several connection counts, and prints a markdown table:
# requests/s, latency p50/p99, non-2xx answers, and durable flushes (fsyncs) per request,
# scraped from /metrics (webio_router_spool_flushes_total / webio_router_spool_appends_total).
#
# Usage: bench/spool.sh [DURATION] [CONNECTIONS...]     e.g. bench/spool.sh 15s 1 16 64 256
# Not a test: nothing here asserts a number.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
duration="${1:-10s}"
shift || true
conns=("$@")
[ ${#conns[@]} -gt 0 ] || conns=(1 16 64 256)
threads="${WRK_THREADS:-2}"

if ! command -v wrk >/dev/null; then
  echo "wrk not found; installing it (Debian package)" >&2
  if [ "$(id -u)" = 0 ]; then apt-get install -y wrk >&2 || { apt-get update >&2 && apt-get install -y wrk >&2; }
  else sudo apt-get install -y wrk >&2; fi
fi

cargo build --release --quiet --manifest-path "$root/Cargo.toml"
target="${CARGO_TARGET_DIR:-$root/target}"
bin="$target/release/webio-router"

dir="$(mktemp -d "${TMPDIR:-/var/tmp}/webio-spool-bench.XXXXXX")"
pid=""
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  rm -rf "$dir"
}
trap cleanup EXIT

cat > "$dir/routes.toml" <<TOML
[sinks.archive]
type = "file"
path = "$dir/events.jsonl"

[[routes]]
name = "everything"
to = ["archive"]
TOML
cat > "$dir/webio-router.toml" <<TOML
routes_file = "$dir/routes.toml"
[server]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[auth]
secrets = ["bench-secret-bench-secret-bench-secret-0123"]
[delivery]
mode = "spool"
spool_dir = "$dir/spool"
dead_letter_file = "$dir/dead-letter.jsonl"
[log]
format = "json"
level = "warn,webio_router::app=info"
TOML

export WEBIO_TOKEN
WEBIO_TOKEN="$("$bin" --config "$dir/webio-router.toml" token --ttl 0)"
"$bin" --config "$dir/webio-router.toml" 2>"$dir/router.log" &
pid=$!
for _ in $(seq 200); do
  grep -q 'webio-router ready' "$dir/router.log" 2>/dev/null && break
  sleep 0.05
done
ready="$(grep 'webio-router ready' "$dir/router.log")" || { cat "$dir/router.log" >&2; exit 1; }
hook="$(sed -E 's/.*"webhook":"Some\(([0-9.:]+)\)".*/\1/' <<<"$ready")"
admin="$(sed -E 's/.*"admin":"Some\(([0-9.:]+)\)".*/\1/' <<<"$ready")"

metric() { # sum of the samples of a metric name (optionally filtered by a label string)
  curl -fsS "http://$admin/metrics" | awk -v m="$1" -v f="${2:-}" \
    '$1 ~ "^"m"({|$)" && index($1, f) { s += $NF } END { printf "%.0f\n", s }'
}
command -v curl >/dev/null || { echo "curl is needed to scrape /metrics" >&2; exit 1; }

echo "spool-mode benchmark: $(nproc) cores, wrk -t$threads -d$duration, file sink, $(uname -r)"
echo
echo "| connections | requests/s | p50 | p99 | non-2xx | appends | flushes | flushes/request |"
echo "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
run=0
for c in "${conns[@]}"; do
  run=$((run + 1))
  t=$threads; [ "$c" -lt "$t" ] && t=$c
  f0=$(metric webio_router_spool_flushes_total); a0=$(metric webio_router_spool_appends_total)
  r0=$(metric webio_router_requests_total); ok0=$(metric webio_router_requests_total 'status="2')
  out="$(WEBIO_RUN=$run wrk -t"$t" -c"$c" -d"$duration" --latency -s "$root/bench/spool.lua" "http://$hook/webhooks/webio")"
  f1=$(metric webio_router_spool_flushes_total); a1=$(metric webio_router_spool_appends_total)
  r1=$(metric webio_router_requests_total); ok1=$(metric webio_router_requests_total 'status="2')
  rps="$(awk '/^Requests\/sec:/ {printf "%.0f", $2}' <<<"$out")"
  p50="$(awk '$1 == "50%" {print $2}' <<<"$out")"
  p99="$(awk '$1 == "99%" {print $2}' <<<"$out")"
  flushes=$((f1 - f0)); appends=$((a1 - a0)); non2xx=$(( (r1 - r0) - (ok1 - ok0) ))
  ratio="$(awk -v f="$flushes" -v a="$appends" 'BEGIN { if (a > 0) printf "%.3f", f / a; else print "n/a" }')"
  echo "| $c | $rps | $p50 | $p99 | $non2xx | $appends | $flushes | $ratio |"
done
# The spool accepts faster than one file sink writes: measure how fast the backlog drains.
p0=$(metric webio_router_spool_pending); t0=$(date +%s.%N); p=$p0
while [ "$p" -gt 0 ]; do
  awk -v t0="$t0" -v now="$(date +%s.%N)" 'BEGIN { exit !(now - t0 > 600) }' && break
  sleep 0.5; p=$(metric webio_router_spool_pending)
done
t1=$(date +%s.%N)
echo
awk -v p0="$p0" -v p="$p" -v t0="$t0" -v t1="$t1" 'BEGIN {
  d = t1 - t0; printf "backlog when the load stopped: %d (event, sink) pairs; %d left after %.1f s", p0, p, d
  if (p0 > 0 && d > 0) printf " (%.0f deliveries/s to the file sink)", (p0 - p) / d
  print "" }'
echo "delivered to the file sink: $(wc -l < "$dir/events.jsonl") lines; dead letters: $(cat "$dir/dead-letter.jsonl" 2>/dev/null | wc -l)"
echo "flushes = durable spool commits (fsyncs); commits that only record deliveries skip the fsync unless the last one is over 1 s old"
