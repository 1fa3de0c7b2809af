-- wrk script for bench/spool.sh: POSTs a distinct Webio inboundMessage per request (distinct
-- body, so a distinct event id: no request is a dedup hit), with the token in WEBIO_TOKEN.
local token = os.getenv("WEBIO_TOKEN") or ""
local path = os.getenv("WEBIO_PATH") or "/webhooks/webio"
local run = os.getenv("WEBIO_RUN") or "0"
local threads = {}
local counter = 0
-- `tid` is a global set per thread by setup() below.

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  tid = tid or 0
end

function request()
  counter = counter + 1
  local body = string.format(
    '{"type":"inboundMessage","conversationId":"bench-%s-%d","communicationActionId":"%d","inboundChannelAddress":"447700900123","outboundChannelAddress":"WhatsApp Bench","body":"benchmark message %s/%d/%d","dateCreated":"2021-01-28 12:22:15.397"}',
    run, tid, counter, run, tid, counter)
  return wrk.format("POST", path, {
    ["content-type"] = "application/json",
    ["x-webio-token"] = token,
  }, body)
end
