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

-- Dead-letter a task: kept with its payload and the reason, out of every other state.
local function bury(id, now, reason_json)
  redis.call('ZREM', K_LEASES, id)
  redis.call('HDEL', K_TOKENS, id)
  redis.call('ZADD', K_DEAD, now, id)
  redis.call('HSET', K_DEAD_REASONS, id, reason_json)
  count('dead', 1)
end

-- Dead-letter a task whose bookkeeping field `key` held garbage (`why` names it). The
-- field goes: a requeue from the dead letters starts the task afresh.
local function bury_corrupt(id, now, key, why)
  redis.call('HDEL', key, id)
  bury(id, now, cjson.encode({reason = why, at = now}))
  count('corrupt', 1)
end

-- Put a task back in the ready queue at its original place (its stored score). Returns
-- false when the score was corrupt and the task was dead-lettered instead.
local function requeue(id, now)
  local score, why = score_in(redis.call('HGET', K_SCORES, id), id)
  if not score then
    bury_corrupt(id, now, K_SCORES, why)
    return false
  end
  redis.call('ZADD', K_QUEUE, score, id)
  return true
end

-- Forget a finished task's bookkeeping (the payload too).
local function forget(id)
  redis.call('HDEL', K_TASKS, id)
  redis.call('HDEL', K_TOKENS, id)
  redis.call('HDEL', K_DELIVERIES, id)
  redis.call('HDEL', K_FAILURES, id)
  redis.call('HDEL', K_SCORES, id)
end

-- Move leases that expired before `now` back to the queue; bounded by `limit`. Returns
-- how many were queued again.
local function reap_expired(now, limit)
  if limit <= 0 then return 0 end
  local expired = redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', now, 'LIMIT', 0, limit)
  local queued = 0
  for _, id in ipairs(expired) do
    redis.call('ZREM', K_LEASES, id)
    redis.call('HDEL', K_TOKENS, id)
    if requeue(id, now) then queued = queued + 1 end
  end
  count('reaped', #expired)
  return queued
end

-- Move delayed tasks that are due to the queue; bounded by `limit`. Returns how many.
local function promote_due(now, limit)
  if limit <= 0 then return 0 end
  local due = redis.call('ZRANGEBYSCORE', K_DELAYED, '-inf', now, 'LIMIT', 0, limit)
  local queued = 0
  for _, id in ipairs(due) do
    redis.call('ZREM', K_DELAYED, id)
    if requeue(id, now) then queued = queued + 1 end
  end
  return queued
end

-- Forget finished ids whose dedupe window has passed; bounded by `limit`.
local function expire_finished(now, limit)
  if limit <= 0 then return end
  local passed = redis.call('ZRANGEBYSCORE', K_FINISHED, '-inf', now, 'LIMIT', 0, limit)
  if #passed > 0 then redis.call('ZREM', K_FINISHED, unpack(passed)) end
end

-- The dead tasks a dead-letter operation works on: ARGV[1] limit, ARGV[2..] ids (none =
-- the oldest `limit`).
local function dead_selection(argv)
  if #argv > 1 then
    local ids = {}
    for i = 2, #argv do ids[#ids + 1] = argv[i] end
    return ids
  end
  return redis.call('ZRANGE', K_DEAD, 0, tonumber(argv[1]) - 1)
end

-- Wake up to n idle workers blocked on the wake list (BLPOP). Tokens are hints, not
-- work: a spurious wake-up costs one empty claim. The list is bounded.
local function wake(n)
  if n <= 0 then return end
  local tokens = {}
  for i = 1, math.min(n, 64) do tokens[i] = '1' end
  redis.call('LPUSH', K_WAKE, unpack(tokens))
  redis.call('LTRIM', K_WAKE, 0, 127)
end

-- Bulk helpers: one command for many members, in slices that fit Lua's unpack limit.
local BULK_SLICE = 4000

-- Append a pair to a flat list (field/value, score/member).
local function push2(list, a, b)
  local len = #list
  list[len + 1] = a
  list[len + 2] = b
end

-- cmd key a1 b1 a2 b2 ... for a flat list of pairs; nothing for an empty list.
local function bulk_write(cmd, key, flat)
  local len = #flat
  for first = 1, len, BULK_SLICE do
    redis.call(cmd, key, unpack(flat, first, math.min(first + BULK_SLICE - 1, len)))
  end
end

-- cmd key m1 m2 ... (HDEL, ZREM, RPUSH ...), in slices; returns the replies of list-replying
-- commands, concatenated.
local function bulk_call(cmd, key, members)
  local out, len = {}, #members
  for first = 1, len, BULK_SLICE do
    local reply = redis.call(cmd, key, unpack(members, first, math.min(first + BULK_SLICE - 1, len)))
    if type(reply) == 'table' then
      for _, value in ipairs(reply) do out[#out + 1] = value end
    end
  end
  return out
end

-- forget() for many finished tasks at once.
local function forget_all(ids)
  for _, key in ipairs({K_TASKS, K_TOKENS, K_DELIVERIES, K_FAILURES, K_SCORES}) do
    bulk_call('HDEL', key, ids)
  end
end

-- HGET of many fields, one call each: HMGET is not in every least-privilege ACL
-- (config/acl.conf), and inside a script the difference is small.
local function hget_each(key, fields)
  local out = {}
  for i, field in ipairs(fields) do out[i] = redis.call('HGET', key, field) end
  return out
end
