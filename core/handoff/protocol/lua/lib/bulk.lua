-- bulk: one command for many members, forgetting finished tasks, HGET of many fields
-- Included by the scripts that list it on their `-- include:` line (scripts.py puts the
-- included files, in the order of lib/ORDER, after the key header and before the body).

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
  if redis.call('EXISTS', K_DEADLINES) == 1 then bulk_call('HDEL', K_DEADLINES, ids) end
  if groups_used() then bulk_call('HDEL', K_TASK_GROUPS, ids) end
end

-- HGET of many fields, one call each: HMGET is not in every least-privilege ACL
-- (config/acl.conf), and inside a script the difference is small.
local function hget_each(key, fields)
  local out = {}
  for i, field in ipairs(fields) do out[i] = redis.call('HGET', key, field) end
  return out
end
