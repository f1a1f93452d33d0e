-- base: time, counters, standing keys, bookkeeping read safely, the agent's key names
-- Included by the scripts that list it on their `-- include:` line (scripts.py puts the
-- included files, in the order of lib/ORDER, after the key header and before the body).

-- Shared by every script (prepended at load time, after the key header that
-- scripts.py generates from keys.py AGENT_KEY_NAMES: `local K_QUEUE, ... = KEYS[1], ...`
-- and FIXED_KEYS). Every key of one agent type shares the hash tag {agent}, so each
-- script touches one cluster slot.

-- Server time in ms, unless the caller passed one (tests drive a virtual clock).
local function now_ms(arg)
  if arg ~= nil and arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Add n to a counter in the stats hash. Counting is never why a script fails: a counter
-- someone overwrote with text starts again from n.
local function count(field, n)
  if n == 0 then return end
  local reply = redis.pcall('HINCRBY', K_STATS, field, n)
  if type(reply) == 'table' and reply.err then redis.pcall('HSET', K_STATS, field, n) end
end

-- An agent's standing key (outbox, limits, group counts, a group's limiter) that someone
-- overwrote with another type holds nothing a script can read: it goes, counted as
-- corrupt, and what it held starts again. True if it went.
local function standing(key, kind)
  local was = redis.call('TYPE', key).ok
  if was == kind or was == 'none' then return false end
  redis.call('DEL', key)
  count('corrupt', 1)
  return true
end

-- HINCRBY on a standing hash that an overwritten field or key does not stop: the field
-- starts again from n (counted as corrupt).
local function incr(key, field, n)
  local reply = redis.pcall('HINCRBY', key, field, n)
  if type(reply) ~= 'table' then return reply end
  if not standing(key, 'hash') then count('corrupt', 1) end
  redis.call('HSET', key, field, n)
  return n
end

-- Bookkeeping read from the agent's hashes is checked before a script writes anything
-- that depends on it: a value someone else wrote there would otherwise stop the script
-- half way (Redis does not roll a script back), leaving tasks in no state at all.

-- A score as stored (a string, passed on as is), absent = '0'; nil and a reason if it is
-- not a finite number.
local function score_in(raw, id)
  if not raw then return '0' end
  local value = tonumber(raw)
  if value and value == value and value ~= math.huge and value ~= -math.huge then return raw end
  return nil, 'corrupt bookkeeping: scores[' .. id .. '] = ' .. string.sub(raw, 1, 40) ..
    ' is not a number'
end

-- A count (deliveries, failures), absent = 0; nil and a reason if not a whole number.
local function count_in(hash, raw, id)
  if not raw then return 0 end
  if string.match(raw, '^%-?%d+$') and #raw < 16 then return tonumber(raw) end
  return nil, 'corrupt bookkeeping: ' .. hash .. '[' .. id .. '] = ' .. string.sub(raw, 1, 40) ..
    ' is not a whole number'
end

-- (AGENT_BASE and run_key, the agent's keys named at run time, are in the key header.)
