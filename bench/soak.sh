#!/usr/bin/env bash
# Soak test: does the daemon keep its promise (every 202 delivered) over minutes of load with
# a sink failing and `kill -9` every K seconds? Not a test suite: a script that prints a ledger.
#
# What it does, on loopback, in a temporary directory:
#   - builds the release binary (cargo build --release), unless SOAK_BIN names one;
#   - runs the daemon in spool mode with two sinks: `file` (JSON Lines, one file per event type,
#     fsync on) and `http` (bench/soak.py's sink, which answers 503 to a few requests at random
#     and is stopped for SOAK_HTTP_DOWN seconds of every SOAK_HTTP_CYCLE, so retries and a
#     backlog are exercised);
#   - drives distinct signed webhooks at a steady SOAK_RATE per second (bench/soak.py drive);
#     a webhook not answered 200/202 (daemon killed, restarting, connection cut) is sent again,
#     the same body, as Webio would; every id answered 200/202 is recorded;
#   - kill -9 the daemon every SOAK_KILL_EVERY seconds and starts it again at once;
#   - once the load ends: brings the HTTP sink back, waits until the spool is empty, stops the
#     daemon (SIGTERM), runs `webio-router spool check`, and compares, per sink, the accepted
#     ids with the ids in the sink's output and the dead letters.
#
# The ledger ends with `lost=N` (accepted, but neither delivered nor dead-lettered nor pending);
# exit 1 when N > 0, when the daemon exited by itself, or when the spool did not drain.
# Duplicates (at-least-once: a delivery confirmed just before a kill -9 is repeated) are
# counted separately and are not a failure.
#
# Usage: bench/soak.sh [SECONDS]          (or SOAK_SECONDS; default 300)
# Environment (defaults):
#   SOAK_RATE=150          webhooks per second (moderate: the machine may be shared)
#   SOAK_WORKERS=8         connections of the load generator
#   SOAK_KILL_EVERY=60     seconds between two kill -9 (0: never)
#   SOAK_HTTP=1            0: no HTTP sink (file sink only)
#   SOAK_HTTP_DOWN=15      the HTTP sink is down that many seconds …
#   SOAK_HTTP_CYCLE=45     … of every SOAK_HTTP_CYCLE (first outage at half a cycle)
#   SOAK_HTTP_FAIL=0.02    share of the HTTP sink's answers that are 503 while it is up
#   SOAK_DRAIN_TIMEOUT=120 after the load, how long the spool may go without draining any
#                          further before the script gives up waiting (it waits as long as
#                          the backlog keeps shrinking)
#   SOAK_PORT              webhook port; admin +1, HTTP sink +2 (default: BENCH_PORT if set,
#                          as bench/run.sh takes it, else the first free range of three from
#                          18380 up that no other soak run holds (a lock file per range under
#                          TMPDIR, held for the run) and nothing else has bound)
#   SOAK_BIN=path          use that binary, build nothing
#   SOAK_KEEP=1            keep the work directory (configs, logs, sink output, ids)
# Needs: bash, python3 (standard library), curl, awk, flock (util-linux).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

parse_seconds() {
  case $1 in
    *m) echo $((${1%m} * 60)) ;;
    *s) echo "${1%s}" ;;
    *) echo "$1" ;;
  esac
}
SECONDS_TOTAL=$(parse_seconds "${1:-${SOAK_SECONDS:-300}}")
RATE=${SOAK_RATE:-150}
WORKERS=${SOAK_WORKERS:-8}
KILL_EVERY=${SOAK_KILL_EVERY:-60}
HTTP=${SOAK_HTTP:-1}
HTTP_DOWN=${SOAK_HTTP_DOWN:-15}
HTTP_CYCLE=${SOAK_HTTP_CYCLE:-45}
HTTP_FAIL=${SOAK_HTTP_FAIL:-0.02}
DRAIN_TIMEOUT=${SOAK_DRAIN_TIMEOUT:-120}
PORT=${SOAK_PORT:-${BENCH_PORT:-}}
SECRET="soak-secret-0123456789-0123456789-0123456789"

say() { printf '%s\n' "$*" >&2; }
die() { say "soak: $*"; exit 2; }

[[ $SECONDS_TOTAL =~ ^[0-9]+$ ]] && [ "$SECONDS_TOTAL" -gt 0 ] || die "duration must be seconds (or Ns / Nm), got '${1:-$SOAK_SECONDS}'"
for tool in python3 curl awk flock; do command -v "$tool" >/dev/null || die "$tool is needed"; done

if [ -z "${SOAK_BIN:-}" ]; then
  say "== cargo build --release"
  cargo build --release --locked --bin webio-router >&2
fi
BIN=${SOAK_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/webio-router}
[ -x "$BIN" ] || die "no binary at $BIN"

# The three ports are kept for the whole run (the daemon and the sink start again on them), so
# a range is taken under a lock (fd 9, held until the script exits) that another soak run respects.
take_ports() {
  mkdir -p "${TMPDIR:-/tmp}"
  exec 9>"${TMPDIR:-/tmp}/webio-soak-port-$1.lock"
  flock -n 9 && python3 "$ROOT/bench/soak.py" free "$1" 3 && return 0
  exec 9>&-
  return 1
}
if [ -n "$PORT" ]; then
  [[ $PORT =~ ^[0-9]+$ ]] || die "SOAK_PORT / BENCH_PORT must be a port number, got '$PORT'"
  take_ports "$PORT" || die "a port of $PORT..$((PORT + 2)) is in use (or another soak run has them); set SOAK_PORT to a free range"
else
  PORT=18380
  until take_ports "$PORT"; do
    PORT=$((PORT + 3))
    [ "$PORT" -lt 18680 ] || die "no free range of three ports in 18380..18679; set SOAK_PORT"
  done
fi
HOOK=$PORT ADMIN=$((PORT + 1)) SINK_PORT=$((PORT + 2))

WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/webio-soak.XXXXXX")
PID="" SINK_PID="" DRIVER_PID=""
cleanup() {
  local p
  for p in $DRIVER_PID $SINK_PID $PID; do kill -KILL "$p" 2>/dev/null || true; done
  for p in $DRIVER_PID $SINK_PID $PID; do wait "$p" 2>/dev/null || true; done
  if [ "${SOAK_KEEP:-0}" = 1 ]; then say "work directory kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- configuration
mkdir -p "$WORK/out"
cat >"$WORK/webio-router.toml" <<EOF
routes_file = "$WORK/routes.toml"
[server]
listen = "127.0.0.1:$HOOK"
[admin]
listen = "127.0.0.1:$ADMIN"
# In the work directory: the default (var/control.sock under the checkout) would clash with
# another run's daemon.
control_socket = "$WORK/control.sock"
[auth]
secrets = ["$SECRET"]
[delivery]
mode = "spool"
spool_dir = "$WORK/spool"
dead_letter_file = "$WORK/dead-letter.jsonl"
retry_initial = "200ms"
retry_max = "5s"
shutdown_timeout = "5s"
[log]
level = "info"
EOF
{
  cat <<EOF
[sinks.file]
type = "file"
path = "$WORK/out/{type}.jsonl"
EOF
  if [ "$HTTP" = 1 ]; then
    cat <<EOF

[sinks.http]
type = "http"
url = "http://127.0.0.1:$SINK_PORT/ingest"
timeout = "5s"
EOF
  fi
  cat <<EOF

[[routes]]
name = "everything"
to = [$([ "$HTTP" = 1 ] && echo '"file", "http"' || echo '"file"')]
EOF
} >"$WORK/routes.toml"
"$BIN" --config "$WORK/webio-router.toml" check >"$WORK/check.txt" 2>&1 || { cat "$WORK/check.txt" >&2; die "check refused the configuration"; }
TOKEN=$("$BIN" --config "$WORK/webio-router.toml" token --ttl 0 --org 1234)

# ---------------------------------------------------------------- helpers
now_ms() { local t=${EPOCHREALTIME/./}; echo "$((10#$t / 1000))"; }
T0=$(now_ms)
elapsed() { echo "$((($(now_ms) - T0) / 1000))"; }
stamp() { printf 't=%4ss ' "$(elapsed)"; }
kib() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
mib() { awk -v k="${1:-0}" 'BEGIN { printf "%.1f MiB", k / 1024 }'; }

STARTS=0 CRASHES=0 MAX_HWM=0 READY_MAX=0 READY_SUM=0
start_daemon() {
  local t0 deadline code
  STARTS=$((STARTS + 1))
  echo "---- start $STARTS at t=$(elapsed)s" >>"$WORK/router.log"
  t0=$(now_ms)
  "$BIN" --config "$WORK/webio-router.toml" serve >>"$WORK/router.log" 2>&1 &
  PID=$!
  deadline=$((t0 + 60000))
  while :; do
    code=$(curl -s -o /dev/null -m 1 -w '%{http_code}' "http://127.0.0.1:$ADMIN/readyz" || true)
    # Ready, and ours: not another process that took the port while ours failed to bind it.
    [ "$code" = 200 ] && kill -0 "$PID" 2>/dev/null && break
    if ! kill -0 "$PID" 2>/dev/null || [ "$(now_ms)" -gt "$deadline" ]; then
      tail -20 "$WORK/router.log" >&2
      die "the daemon did not become ready (start $STARTS); log above"
    fi
    sleep 0.02
  done
  READY_LAST=$(($(now_ms) - t0))
  READY_SUM=$((READY_SUM + READY_LAST))
  [ "$READY_LAST" -le "$READY_MAX" ] || READY_MAX=$READY_LAST
}
note_hwm() { local h; h=$(kib "$PID" VmHWM); [ "${h:-0}" -le "$MAX_HWM" ] || MAX_HWM=$h; }

start_sink() {
  python3 "$ROOT/bench/soak.py" sink "$SINK_PORT" "$WORK/http-received.txt" "$HTTP_FAIL" 2>>"$WORK/sink.log" &
  SINK_PID=$!
  local i
  for i in $(seq 1 250); do
    kill -0 "$SINK_PID" 2>/dev/null || die "the HTTP sink exited: $(tail -3 "$WORK/sink.log")"
    { exec 3<>"/dev/tcp/127.0.0.1/$SINK_PORT"; } 2>/dev/null && { exec 3>&-; return 0; }
    sleep 0.02
  done
  die "the HTTP sink did not start: $(tail -3 "$WORK/sink.log")"
}
stop_sink() { kill -KILL "$SINK_PID" 2>/dev/null || true; wait "$SINK_PID" 2>/dev/null || true; SINK_PID=""; }

metrics() { curl -s -m 5 "http://127.0.0.1:$ADMIN/metrics"; }
pending_total() { metrics | awk '$1 ~ /^webio_router_spool_pending[{ ]|^webio_router_spool_pending$/ { s += $NF; n++ } END { if (n) printf "%d\n", s; else print "?" }'; }
pending_json() { metrics | awk '
  $1 ~ /^webio_router_spool_pending\{/ { match($1, /sink="[^"]*"/); s = substr($1, RSTART + 6, RLENGTH - 7); out = out sep "\"" s "\": " int($NF); sep = ", " }
  END { print "{" out "}" }'; }

# ---------------------------------------------------------------- run
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
say "== soak: ${SECONDS_TOTAL}s at ${RATE}/s, kill -9 every ${KILL_EVERY}s$([ "$HTTP" = 1 ] && echo ", HTTP sink down ${HTTP_DOWN}s of every ${HTTP_CYCLE}s and 503 to $HTTP_FAIL of requests") (work directory $WORK)"
[ "$HTTP" = 1 ] && start_sink
start_daemon
sleep 1
RSS_START=$(kib "$PID" VmRSS)
say "$(stamp)daemon ready in ${READY_LAST} ms, RSS $(mib "$RSS_START")"

T_LOAD=$(now_ms)
python3 "$ROOT/bench/soak.py" drive "127.0.0.1:$HOOK" /webhooks/webio "$TOKEN" "$RATE" "$SECONDS_TOTAL" "$WORKERS" \
  "$WORK/accepted.txt" >"$WORK/driver.json" 2>"$WORK/driver.log" &
DRIVER_PID=$!

KILLS=0 NEXT_KILL=$KILL_EVERY SINK_DOWNS=0 RSS_BEFORE_KILLS="" NEXT_SAMPLE=0 MAX_PENDING=0
load_s() { echo "$((($(now_ms) - T_LOAD) / 1000))"; }
while kill -0 "$DRIVER_PID" 2>/dev/null; do
  s=$(load_s)
  # The daemon must only die when we kill it.
  if ! kill -0 "$PID" 2>/dev/null; then
    code=0; wait "$PID" || code=$?
    CRASHES=$((CRASHES + 1))
    say "$(stamp)the daemon EXITED BY ITSELF (status $code); log tail:"; tail -5 "$WORK/router.log" >&2
    start_daemon
  fi
  if [ "$KILL_EVERY" -gt 0 ] && [ "$s" -ge "$NEXT_KILL" ] && [ "$s" -lt "$SECONDS_TOTAL" ]; then
    note_hwm
    rss=$(kib "$PID" VmRSS)
    RSS_BEFORE_KILLS="$RSS_BEFORE_KILLS $(awk -v k="$rss" 'BEGIN { printf "%.1f", k / 1024 }')"
    kill -KILL "$PID"; wait "$PID" 2>/dev/null || true
    KILLS=$((KILLS + 1))
    start_daemon
    say "$(stamp)kill -9 #$KILLS (RSS was $(mib "$rss")), ready again in ${READY_LAST} ms; accepted so far: $(wc -l <"$WORK/accepted.txt")"
    NEXT_KILL=$((NEXT_KILL + KILL_EVERY))
  fi
  if [ "$HTTP" = 1 ] && [ "$s" -lt "$SECONDS_TOTAL" ]; then
    half=$((HTTP_CYCLE / 2))
    down=0
    if [ "$s" -ge "$half" ] && [ $(((s - half) % HTTP_CYCLE)) -lt "$HTTP_DOWN" ]; then down=1; fi
    if [ "$down" = 1 ] && [ -n "$SINK_PID" ]; then
      stop_sink; SINK_DOWNS=$((SINK_DOWNS + 1))
      say "$(stamp)HTTP sink down (#$SINK_DOWNS), spool pending: $(pending_total)"
    elif [ "$down" = 0 ] && [ -z "$SINK_PID" ]; then
      start_sink; say "$(stamp)HTTP sink up, spool pending: $(pending_total)"
    fi
  fi
  if [ "$s" -ge "$NEXT_SAMPLE" ]; then
    p=$(pending_total)
    [ "$p" = "?" ] || [ "$p" -le "$MAX_PENDING" ] || MAX_PENDING=$p
    NEXT_SAMPLE=$((s + 5))
  fi
  sleep 0.2
done
wait "$DRIVER_PID" || die "the load generator failed: $(tail -5 "$WORK/driver.log")"
DRIVER_PID=""
RSS_LOAD_END=$(kib "$PID" VmRSS)
if [ "$HTTP" = 1 ] && [ -z "$SINK_PID" ]; then start_sink; say "$(stamp)HTTP sink up"; fi
PENDING_LOAD_END=$(pending_total)
[ "$PENDING_LOAD_END" = "?" ] || [ "$PENDING_LOAD_END" -le "$MAX_PENDING" ] || MAX_PENDING=$PENDING_LOAD_END
say "$(stamp)load over: $(wc -l <"$WORK/accepted.txt") accepted; waiting for the spool to drain (pending $PENDING_LOAD_END)"

# ---------------------------------------------------------------- drain
DRAINED=0 T_DRAIN=$(now_ms) T_PROGRESS=$(now_ms) LOWEST=""
while [ $(($(now_ms) - T_PROGRESS)) -lt $((DRAIN_TIMEOUT * 1000)) ]; do
  if ! kill -0 "$PID" 2>/dev/null; then
    CRASHES=$((CRASHES + 1)); say "$(stamp)the daemon EXITED BY ITSELF while draining"; start_daemon
  fi
  p=$(pending_total)
  if [ "$p" = 0 ]; then DRAINED=1; break; fi
  if [ "$p" != "?" ] && { [ -z "$LOWEST" ] || [ "$p" -lt "$LOWEST" ]; }; then LOWEST=$p T_PROGRESS=$(now_ms); fi
  sleep 0.5
done
DRAIN_MS=$(($(now_ms) - T_DRAIN))
pending_json >"$WORK/pending.json"
note_hwm
RSS_END=$(kib "$PID" VmRSS)
say "$(stamp)$([ "$DRAINED" = 1 ] && echo "drained in $((DRAIN_MS / 1000)) s" || echo "NOT drained: no progress for ${DRAIN_TIMEOUT}s: $(cat "$WORK/pending.json")")"

T_STOP=$(now_ms)
kill -TERM "$PID"
STOP_CODE=0; wait "$PID" || STOP_CODE=$?
STOP_MS=$(($(now_ms) - T_STOP))
PID=""
[ "$HTTP" = 1 ] && stop_sink
CHECK_CODE=0
"$BIN" --config "$WORK/webio-router.toml" spool check >"$WORK/spool-check.txt" 2>&1 || CHECK_CODE=$?

# ---------------------------------------------------------------- ledger
echo
echo "soak ledger: $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD 2>/dev/null || echo '+dirty'), $(nproc) cores, load average before $LOAD_BEFORE, after $(cut -d' ' -f1-3 /proc/loadavg)"
echo "setup: ${SECONDS_TOTAL} s of load at ${RATE}/s over $WORKERS connections; spool mode; sinks: file$([ "$HTTP" = 1 ] && echo " + http (down ${HTTP_DOWN} s of every ${HTTP_CYCLE} s, $SINK_DOWNS outages; 503 to $HTTP_FAIL of requests)")"
echo "daemon: $KILLS kill -9, $STARTS starts (ready in $((READY_SUM / STARTS)) ms on average, $READY_MAX ms at most), $CRASHES exits by itself; drain after the load $(awk -v m="$DRAIN_MS" 'BEGIN { printf "%.1f s", m / 1000 }'); SIGTERM exit $STOP_CODE in $STOP_MS ms"
echo "spool backlog: at most $MAX_PENDING (event, sink) pairs pending (sampled every 5 s), $PENDING_LOAD_END when the load ended"
echo "RSS: start $(mib "$RSS_START") (idle, after ready), end of load $(mib "$RSS_LOAD_END"), end $(mib "$RSS_END") (after the drain); before each kill -9 (MiB):${RSS_BEFORE_KILLS:- none}; peak of any process $(mib "$MAX_HWM")"
echo "spool check after the stop (exit $CHECK_CODE): $(grep -E 'healthy|damaged|pending deliveries' "$WORK/spool-check.txt" | paste -sd ';' - | sed 's/;/; /g')"
LEDGER_CODE=0
python3 "$ROOT/bench/soak.py" ledger "$WORK/driver.json" "$WORK/accepted.txt" "$WORK/dead-letter.jsonl" \
  "$WORK/pending.json" "file=file:$WORK/out/*.jsonl" $([ "$HTTP" = 1 ] && echo "http=ids:$WORK/http-received.txt") || LEDGER_CODE=$?
[ "$LEDGER_CODE" = 0 ] || [ "$LEDGER_CODE" = 1 ] || die "the ledger failed (exit $LEDGER_CODE)"
STATUS=$LEDGER_CODE
if [ "$CRASHES" -gt 0 ]; then say "FAIL: the daemon exited by itself $CRASHES time(s); see $WORK/router.log (SOAK_KEEP=1 keeps it)"; STATUS=1; fi
if [ "$DRAINED" != 1 ]; then say "FAIL: the spool stopped draining (no progress for ${DRAIN_TIMEOUT}s)"; STATUS=1; fi
exit "$STATUS"
