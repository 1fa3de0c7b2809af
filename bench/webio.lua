-- wrk script for bench/run.sh: posts DISTINCT Webio webhooks with a valid token.
--
-- Environment:
--   WEBIO_TOKEN        the JWT for the x-webio-token header (`webio-router token --ttl 0`)
--   WEBIO_RATE         optional: target requests/s *per wrk thread*; when set, each thread
--                      paces its requests on a fixed schedule (wrk has no -R; see
--                      docs/performance.md for what this approximates)
--
-- Every request gets a new conversation id and communication action id (thread id, a
-- per-run nonce and a counter), so every request is a new event: no dedup short-cut.
-- Four payload shapes rotate: current messageStatusUpdate, current inboundMessage, legacy
-- message send (a messageStatusUpdate without communicationActionId) and conversationClosed.
-- At the end one machine-readable line is printed: `WEBIO_BENCH key=value ...`.

local ffi = require("ffi")
ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } webio_timespec;
  int clock_gettime(int clk_id, webio_timespec *tp);
]]
local ts = ffi.new("webio_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local threads = {}
local next_tid = 1

function setup(thread)
  thread:set("tid", next_tid)
  next_tid = next_tid + 1
  table.insert(threads, thread)
end

local tid, nonce, counter
local token = os.getenv("WEBIO_TOKEN") or ""
local headers = { ["x-webio-token"] = token, ["content-type"] = "application/json" }

local shapes = {
  [[{"type":"messageStatusUpdate","conversationId":"%s","communicationActionId":"%s","outboundChannelAddress":"447717472695","inboundChannelAddress":"WhatsApp QA Test","customerUID":"","dateCreated":"2021-01-28 12:22:15.397","statusCode":"2"}]],
  [[{"type":"inboundMessage","conversationId":"%s","communicationActionId":"%s","outboundChannelAddress":"447717472695","inboundChannelAddress":"WhatsApp QA Test","customerUID":"","body":"No I don't, thanks","dateCreated":"2021-01-28 12:21:28.373"}]],
  [[{"type":"messageStatusUpdate","conversationId":"%s","outboundChannelAddress":"447700900123","inboundChannelAddress":"SMS Longcode","customerUID":"CUST-%s","dateCreated":"2020-11-03 09:15:40.005","statusCode":"1"}]],
  [[{"type":"conversationClosed","conversationId":"%s","closedBy":"agent-%s","dateCreated":"2025-05-19 16:40:00.000"}]],
}

function init(args)
  tid = tonumber(wrk.thread:get("tid")) or 0
  nonce = string.format("%x", math.floor(now_ms() * 1000) % 0xffffffff)
  counter = 0
end

function request()
  counter = counter + 1
  local shape = shapes[(counter % #shapes) + 1]
  local conv = string.format("%d%09d", tid, counter)
  local action = string.format("%s-%d-%d", nonce, tid, counter)
  return wrk.format("POST", nil, headers, string.format(shape, conv, action))
end

local rate = tonumber(os.getenv("WEBIO_RATE") or "")
if rate and rate > 0 then
  local interval = 1000 / rate -- ms between two requests of this thread
  local slot = nil
  -- Called before every request of this thread: wait for the next free slot of a fixed
  -- schedule. A schedule that fell behind (every connection busy) restarts from now, so the
  -- achieved rate is reported rather than made up with a burst.
  function delay()
    local now = now_ms()
    if slot == nil or slot < now - interval then
      slot = now
    end
    local wait = slot - now
    slot = slot + interval
    if wait < 0 then
      wait = 0
    end
    return wait
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  local secs = summary.duration / 1e6
  io.write(string.format(
    "WEBIO_BENCH requests=%d duration_s=%.3f rps=%.1f p50_us=%d p90_us=%d p99_us=%d max_us=%d non2xx=%d sockerr=%d\n",
    summary.requests, secs, summary.requests / secs,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    e.status, e.connect + e.read + e.write + e.timeout))
end
