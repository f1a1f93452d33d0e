-- wait_register: waits parked on agents' slots register with their event (the events'
-- slot: every key here carries the hash tag {events}). Standalone: no agent's keys.
-- KEYS[1] <prefix>:{events}:sig:<event>   KEYS[2] <prefix>:{events}:waiters:<event>
-- KEYS[3] <prefix>:{events}:outbox
-- ARGV[1] now in ms ('' = server TIME)   ARGV[2] keep the waiters at least this long, ms
--   (0 = a wait with no timeout: 367 days, past the longest timeout, or a signal)
-- then pairs: then-task id, its agent
-- An event still signalled (its data within signal_ttl_s) resumes the wait at once: a
-- resume is written to the outbox (field '<id>:r', value now SEP agent SEP id SEP data)
-- for the caller to deliver (wait_resume.lua) and forget; else the wait joins the
-- event's waiters. Idempotent: registering twice adds nothing, and a resume delivered
-- twice resumes once.
-- Returns: the resumes written, flat: field, agent, id, data, ...
local SIG, WAITERS, OUTBOX = KEYS[1], KEYS[2], KEYS[3]
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local keep = tonumber(ARGV[2])
local FOREVER_MS = 367 * 86400000  -- a wait with no timeout: past the longest timeout
local data = redis.call('GET', SIG)
local existed = redis.call('EXISTS', WAITERS) == 1
local out = {}
for o = 3, #ARGV, 2 do
  local id, agent = ARGV[o], ARGV[o + 1]
  if data then
    local field = id .. ':r'
    redis.call('HSET', OUTBOX, field, now .. '\31' .. agent .. '\31' .. id .. '\31' .. data)
    out[#out + 1] = field
    out[#out + 1] = agent
    out[#out + 1] = id
    out[#out + 1] = data
  else
    redis.call('HSET', WAITERS, id, agent)
  end
end
-- The waiters live as long as the longest of their waits (no timeout: 367 days), or
-- until the event is signalled, which takes them all.
if not data then
  local left = existed and redis.call('PTTL', WAITERS) or -2
  if keep == 0 then keep = FOREVER_MS end
  if left == -2 or (left >= 0 and left < keep) then
    redis.call('PEXPIRE', WAITERS, keep)
  end
end
return out
