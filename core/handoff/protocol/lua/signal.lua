-- signal: an event happens. Its data is kept for signal_ttl_s (a wait registered later
-- resumes at once), and every wait registered on it is owed a resume.
-- Standalone: every key here carries the hash tag {events}, no agent's keys.
-- KEYS[1] <prefix>:{events}:sig:<event>   KEYS[2] <prefix>:{events}:waiters:<event>
-- KEYS[3] <prefix>:{events}:outbox
-- ARGV[1] now in ms ('' = server TIME)   ARGV[2] signal_ttl ms (0 = keep no signal)
-- ARGV[3] the data (JSON)   ARGV[4] this signal's token (unique: its outbox fields)
-- The waiters move to the outbox in this one script (field '<id>:<token>', value now SEP
-- agent SEP id SEP data): the caller delivers each (wait_resume.lua, on the wait's own
-- slot) and then forgets it; what a crashed caller left there a supervisor's tick
-- delivers. A wait resumes once whoever delivers, and however often.
-- Returns: the resumes written, flat: field, agent, id, ...
local SIG, WAITERS, OUTBOX = KEYS[1], KEYS[2], KEYS[3]
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local ttl, data, token = tonumber(ARGV[2]), ARGV[3], ARGV[4]
if ttl > 0 then redis.call('SET', SIG, data, 'PX', ttl) end
local flat = redis.call('HGETALL', WAITERS)
local out = {}
for i = 1, #flat, 2 do
  local id, agent = flat[i], flat[i + 1]
  local field = id .. ':' .. token
  redis.call('HSET', OUTBOX, field, now .. '\31' .. agent .. '\31' .. id .. '\31' .. data)
  out[#out + 1] = field
  out[#out + 1] = agent
  out[#out + 1] = id
  redis.call('HDEL', WAITERS, id)  -- (HDEL, not DEL: a producer's ACL has no DEL)
end
return out
