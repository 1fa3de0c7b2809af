-- wrk script for bench/backlog.sh: posts exactly WEBIO_COUNT distinct Webio webhooks (the
-- shapes of bench/webio.lua, ~230 bytes on average), then stops.
--
-- Environment:
--   WEBIO_TOKEN   the JWT for the x-webio-token header (`webio-router token --ttl 0`)
--   WEBIO_COUNT   how many requests to send in all (split evenly between the wrk threads)
--   WEBIO_RUN     a label that keeps the ids of two fills apart
--
-- Each thread stops once its share has been answered; at the end one machine-readable line
-- is printed: `WEBIO_BACKLOG sent=... accepted=... body_bytes=...`.

local threads = {}
local next_tid = 1
local nthreads = 0

function setup(thread)
  thread:set("tid", next_tid)
  next_tid = next_tid + 1
  table.insert(threads, thread)
end

local tid, counter, answered, accepted, body_bytes, share
local token = os.getenv("WEBIO_TOKEN") or ""
local run = os.getenv("WEBIO_RUN") or "0"
local headers = { ["x-webio-token"] = token, ["content-type"] = "application/json" }

local shapes = {
  [[{"type":"messageStatusUpdate","conversationId":"%s","communicationActionId":"%s","outboundChannelAddress":"447717472695","inboundChannelAddress":"WhatsApp QA Test","customerUID":"","dateCreated":"2021-01-28 12:22:15.397","statusCode":"2"}]],
  [[{"type":"inboundMessage","conversationId":"%s","communicationActionId":"%s","outboundChannelAddress":"447717472695","inboundChannelAddress":"WhatsApp QA Test","customerUID":"","body":"No I don't, thanks","dateCreated":"2021-01-28 12:21:28.373"}]],
  [[{"type":"messageStatusUpdate","conversationId":"%s","outboundChannelAddress":"447700900123","inboundChannelAddress":"SMS Longcode","customerUID":"CUST-%s","dateCreated":"2020-11-03 09:15:40.005","statusCode":"1"}]],
  [[{"type":"conversationClosed","conversationId":"%s","closedBy":"agent-%s","dateCreated":"2025-05-19 16:40:00.000"}]],
}

function init(args)
  tid = tonumber(wrk.thread:get("tid")) or 0
  local total = tonumber(os.getenv("WEBIO_COUNT") or "") or 100000
  local n = tonumber(os.getenv("WEBIO_THREADS") or "") or 1
  share = math.ceil(total / n)
  counter, answered, accepted, body_bytes = 0, 0, 0, 0
end

function request()
  counter = counter + 1
  local shape = shapes[(counter % #shapes) + 1]
  local conv = string.format("%s%d%09d", run, tid, counter)
  local action = string.format("r%s-%d-%d", run, tid, counter)
  local body = string.format(shape, conv, action)
  return wrk.format("POST", nil, headers, body)
end

function response(status, headers, body)
  answered = answered + 1
  if status == 202 or status == 200 then
    accepted = accepted + 1
  end
  if answered >= share then
    wrk.thread:set("accepted", accepted)
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local acc = 0
  for _, t in ipairs(threads) do
    acc = acc + (tonumber(t:get("accepted")) or 0)
  end
  -- The mean body size of the four shapes as this script fills them (ids of this length).
  local sum = 0
  for i, shape in ipairs(shapes) do
    sum = sum + #string.format(shape, string.format("%s%d%09d", run, 1, 123456), string.format("r%s-%d-%d", run, 1, 123456))
  end
  io.write(string.format("WEBIO_BACKLOG sent=%d accepted=%d mean_body=%.1f duration_s=%.3f non2xx=%d sockerr=%d\n",
    summary.requests, acc, sum / #shapes, summary.duration / 1e6, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
