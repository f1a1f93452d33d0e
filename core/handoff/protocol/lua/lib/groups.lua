-- groups: fair sharing and per-group limits: the rotation, ready sets, running counts
-- Included by the scripts that list it on their `-- include:` line (scripts.py puts the
-- included files, in the order of lib/ORDER, after the key header and before the body).

-- Groups (fair sharing and per-group limits; handoff/protocol/groups.py). A task enqueued
-- with a group waits in its group's own ready set, <base>:gq:<group>, not in the queue.
-- The rotation (K_GROUPS, group -> rank) holds the groups with ready tasks that may start,
-- ranked by their head's priority, then by when they were last served (a turn counter in
-- K_LIMITS): a claim takes one task from the first group, which goes to the back of its
-- priority. The ungrouped queue takes its turn in the same rotation. A group waiting for
-- its rate or a pause is parked (K_PARKED, group -> until ms); one at its concurrency cap
-- leaves the rotation until one of its leases ends. K_TASK_GROUPS (id -> group) and
-- K_GROUP_RUNNING (group -> leases held) are read only when the agent has grouped tasks
-- (the hot path: one EXISTS per call that needs to know).
local GROUPS_USED
local function groups_used()
  if GROUPS_USED == nil then GROUPS_USED = redis.call('EXISTS', K_TASK_GROUPS) == 1 end
  return GROUPS_USED
end

local function group_of(id)
  if not groups_used() then return nil end
  return redis.call('HGET', K_TASK_GROUPS, id)
end

-- Remember a task's group (enqueue, a join's then-task).
local function group_set(id, group)
  redis.call('HSET', K_TASK_GROUPS, id, group)
  GROUPS_USED = true
end

-- A task's group as its JSON says (task.py writes it last in the head, before "payload").
local GROUP_OF_JSON = '^{"id":"[^"]*","agent":"[^"]*"[^{]-"group":"([^"]*)","payload":'

-- Rank in the rotation: the head's priority first, then the turn it was last served.
local PRIO_UNIT = 2 ^ 40
local function rank_of(score, turn)
  return (math.floor(tonumber(score) / PRIORITY_SHIFT) + 1000) * PRIO_UNIT + turn
end

-- A group with ready tasks takes a place in the rotation, at the back of its head's
-- priority; one already there keeps its turn (its head's priority may have changed). A
-- parked group stays parked.
local function rotation_touch(group)
  if redis.call('ZSCORE', K_PARKED, group) then return end
  local head = redis.call('ZRANGE', run_key('gq', group), 0, 0, 'WITHSCORES')
  if #head == 0 then
    redis.call('ZREM', K_GROUPS, group)
    return
  end
  local rank = redis.call('ZSCORE', K_GROUPS, group)
  local turn
  if rank then
    turn = tonumber(rank) % PRIO_UNIT
  else
    turn = incr(K_LIMITS, 'turn', 1)
  end
  redis.call('ZADD', K_GROUPS, rank_of(head[2], turn), group)
end

-- A task becomes ready: in its group's set (and the group in the rotation), or the queue.
local function ready_add(id, score, group)
  group = group or group_of(id)
  if group then
    if redis.call('ZADD', run_key('gq', group), score, id) == 1 then
      incr(K_LIMITS, 'grouped_ready', 1)  -- (queue_stats' count)
    end
    rotation_touch(group)
  else
    redis.call('ZADD', K_QUEUE, score, id)
  end
end

-- A ready task leaves (cancelled): 1 if it was ready.
local function ready_remove(id)
  local group = group_of(id)
  if group then
    local removed = redis.call('ZREM', run_key('gq', group), id)
    if removed == 1 then incr(K_LIMITS, 'grouped_ready', -1) end
    rotation_touch(group)
    return removed
  end
  return redis.call('ZREM', K_QUEUE, id)
end

-- Add delta to the leases group holds (K_GROUP_RUNNING). A count someone overwrote is
-- worked out again, every group's, from the leases (a lease that ended has left them;
-- one being taken has not yet: delta > 0 is added after). Leases this same call took or
-- ended for other groups may be missed: a count errs low (a few more may start until
-- those leases end; it never drops below zero), never high (which would strand a group).
local function group_count(group, delta)
  local reply = redis.pcall('HINCRBY', K_GROUP_RUNNING, group, delta)
  if type(reply) ~= 'table' then return reply end
  count('corrupt', 1)
  redis.call('DEL', K_GROUP_RUNNING)
  local held = {}
  for _, id in ipairs(redis.call('ZRANGE', K_LEASES, 0, -1)) do
    local g = redis.call('HGET', K_TASK_GROUPS, id)
    if g then held[g] = (held[g] or 0) + 1 end
  end
  for g, n in pairs(held) do redis.call('HSET', K_GROUP_RUNNING, g, n) end
  if delta > 0 then return redis.call('HINCRBY', K_GROUP_RUNNING, group, delta) end
  return held[group] or 0
end

-- A lease ended (finished, failed, released, reaped, cancelled, buried): its group holds
-- one less, and takes its place in the rotation again (it may have left it at its cap).
-- Whatever the cap is now: a cap changed live, or by a deploy, while the lease ran must
-- neither leave a count behind nor keep the group out of the rotation.
local function lease_ended(id)
  local group = group_of(id)
  if not group then return end
  if group_count(group, -1) <= 0 then
    redis.call('HDEL', K_GROUP_RUNNING, group)
  end
  rotation_touch(group)
end
