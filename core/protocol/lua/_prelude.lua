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

-- Put a task back in the ready queue at its original place (its stored score).
local function requeue(id)
  local score = redis.call('HGET', K_SCORES, id)
  if not score then score = '0' end
  redis.call('ZADD', K_QUEUE, score, id)
end

-- Dead-letter a task: kept with its payload and the reason, out of every other state.
local function bury(id, now, reason_json)
  redis.call('ZREM', K_LEASES, id)
  redis.call('HDEL', K_TOKENS, id)
  redis.call('ZADD', K_DEAD, now, id)
  redis.call('HSET', K_DEAD_REASONS, id, reason_json)
  redis.call('HINCRBY', K_STATS, 'dead', 1)
end

-- Forget a finished task's bookkeeping (the payload too).
local function forget(id)
  redis.call('HDEL', K_TASKS, id)
  redis.call('HDEL', K_TOKENS, id)
  redis.call('HDEL', K_DELIVERIES, id)
  redis.call('HDEL', K_FAILURES, id)
  redis.call('HDEL', K_SCORES, id)
end

-- Move leases that expired before `now` back to the queue; bounded by `limit`.
local function reap_expired(now, limit)
  if limit <= 0 then return 0 end
  local expired = redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', now, 'LIMIT', 0, limit)
  for _, id in ipairs(expired) do
    redis.call('ZREM', K_LEASES, id)
    redis.call('HDEL', K_TOKENS, id)
    requeue(id)
  end
  if #expired > 0 then redis.call('HINCRBY', K_STATS, 'reaped', #expired) end
  return #expired
end

-- Move delayed tasks that are due to the queue; bounded by `limit`.
local function promote_due(now, limit)
  if limit <= 0 then return 0 end
  local due = redis.call('ZRANGEBYSCORE', K_DELAYED, '-inf', now, 'LIMIT', 0, limit)
  for _, id in ipairs(due) do
    redis.call('ZREM', K_DELAYED, id)
    requeue(id)
  end
  return #due
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
