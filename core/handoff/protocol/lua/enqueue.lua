-- enqueue: add a batch of tasks of one agent type, atomically.
-- include: base, groups, tasks, bulk, scopes, notices, successors
-- KEYS[1..FIXED_KEYS]  the agent's fixed keys (the key header, scripts.py)
-- ARGV[1]      max payload bytes
-- ARGV[2]      now in ms ('' = server TIME)
-- ARGV[3]      n, the number of tasks
-- ARGV[4]      m, the number of tasks with a delay or a deterministic id
-- then n groups of 3: id, score, task_json
-- then m groups of 6: position (1..n), delay_ms (0 = ready now), deterministic (1 = its id
--   comes from a key or a parent: refused while in the finished set's dedupe window),
--   expires_at (ms; 0 = none: a task not started by then ends expired, see claim.lua),
--   parent id ('' = none), group ('' = none: a grouped task waits in its group's ready
--   set, taken in rotation with the others; see groups in lua/lib/)
-- A task of a cancelled run, or handed off by a cancelled task (marked in K_CANCELLED,
-- see cancel.lua), is not stored: it ends cancelled at once (it counts as added).
-- Returns: a list of n integers, 1 = added, 0 = duplicate (already queued/leased/delayed/dead,
-- finished within the dedupe window, or earlier in this batch), then, if a cancelled task's
-- end went to another slot, '|' and outbox field/notice pairs to deliver. A payload over
-- the limit fails the whole batch, unwritten. Writes go in a few bulk commands per batch.
local max_bytes = tonumber(ARGV[1])
local now = now_ms(ARGV[2])
local n = tonumber(ARGV[3])
local m = tonumber(ARGV[4])
local base = 4
for i = 0, n - 1 do
  local json = ARGV[base + i * 3 + 3]
  if #json > max_bytes then
    return redis.error_reply('ERR task ' .. ARGV[base + i * 3 + 1] .. ' is ' .. #json ..
      ' bytes, over the limit of ' .. max_bytes .. ' bytes')
  end
end
local delay, deterministic, expires, parents, groups = {}, {}, {}, {}, {}
for j = 0, m - 1 do
  local o = base + n * 3 + j * 6
  local position = tonumber(ARGV[o + 1])
  delay[position] = tonumber(ARGV[o + 2])
  deterministic[position] = ARGV[o + 3] == '1'
  expires[position] = ARGV[o + 4]
  parents[position] = ARGV[o + 5]
  if ARGV[o + 6] ~= '' then groups[position] = ARGV[o + 6] end
end
local grouped_ready = 0

local added, seen = {}, {}
local tasks, scores, ready, later, deadlines = {}, {}, {}, {}, {}
local added_count = 0
for i = 1, n do
  local o = base + (i - 1) * 3
  local id, score = ARGV[o + 1], ARGV[o + 2]
  local duplicate = seen[id] or redis.call('HEXISTS', K_TASKS, id) == 1
  if not duplicate and deterministic[i] then
    local until_ms = redis.call('ZSCORE', K_FINISHED, id)
    duplicate = until_ms and tonumber(until_ms) > now
  end
  local cancelled_until
  if not duplicate and parents[i] and parents[i] ~= '' then  -- (a task of a run has one)
    cancelled_until = marked(string.match(ARGV[o + 3], RUN_OF), now) or marked(parents[i], now)
  end
  if duplicate then
    added[i] = 0
  elseif cancelled_until then
    added[i] = 1
    seen[id] = true
    end_cancelled(id, now, cancelled_until - now, ARGV[o + 3])
  else
    added[i] = 1
    seen[id] = true
    added_count = added_count + 1
    push2(tasks, id, ARGV[o + 3])
    push2(scores, id, score)
    local d = delay[i]
    local group = groups[i]
    if group then group_set(id, group) end
    if d and d > 0 then
      push2(later, now + d, id)
    elseif group then
      ready_add(id, score, group)
      grouped_ready = grouped_ready + 1
    else
      push2(ready, score, id)
    end
    if expires[i] and expires[i] ~= '0' then push2(deadlines, id, expires[i]) end
  end
end
bulk_write('HSET', K_TASKS, tasks)
bulk_write('HSET', K_SCORES, scores)
bulk_write('ZADD', K_QUEUE, ready)
bulk_write('ZADD', K_DELAYED, later)
bulk_write('HSET', K_DEADLINES, deadlines)
count('enqueued', added_count)
wake(#ready / 2 + grouped_ready)
return with_outboxed(added)
