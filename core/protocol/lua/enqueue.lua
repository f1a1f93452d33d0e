-- enqueue: add a batch of tasks of one agent type, atomically.
-- KEYS[1..12]  the agent's fixed keys (see _prelude.lua)
-- KEYS[13..]   result keys of tasks with a deterministic id (done-dedupe), by index
-- ARGV[1]      max payload bytes
-- ARGV[2]      now in ms ('' = server TIME)
-- ARGV[3]      n, the number of tasks
-- ARGV[4]      m, the number of tasks with a delay or a result key
-- then n groups of 3: id, score, task_json
-- then m groups of 3: position (1..n), delay_ms (0 = ready now), result_key_index (0 = none)
-- Returns: a list of n integers, 1 = added, 0 = duplicate (already queued/leased/delayed/dead,
-- done within the result TTL, or earlier in this batch). A payload over the limit fails the
-- whole batch, unwritten. Writes go in a few bulk commands per batch, not a few per task.
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
local delay, result_key = {}, {}
for j = 0, m - 1 do
  local o = base + n * 3 + j * 3
  local position = tonumber(ARGV[o + 1])
  delay[position] = tonumber(ARGV[o + 2])
  result_key[position] = tonumber(ARGV[o + 3])
end

local added, seen = {}, {}
local tasks, scores, ready, later = {}, {}, {}, {}
local added_count = 0
for i = 1, n do
  local o = base + (i - 1) * 3
  local id, score = ARGV[o + 1], ARGV[o + 2]
  local duplicate = seen[id] or redis.call('HEXISTS', K_TASKS, id) == 1
  local rk = result_key[i]
  if not duplicate and rk and rk > 0 then
    duplicate = redis.call('EXISTS', KEYS[FIXED_KEYS + rk]) == 1
  end
  if duplicate then
    added[i] = 0
  else
    added[i] = 1
    seen[id] = true
    added_count = added_count + 1
    push2(tasks, id, ARGV[o + 3])
    push2(scores, id, score)
    local d = delay[i]
    if d and d > 0 then push2(later, now + d, id) else push2(ready, score, id) end
  end
end
bulk_write('HSET', K_TASKS, tasks)
bulk_write('HSET', K_SCORES, scores)
bulk_write('ZADD', K_QUEUE, ready)
bulk_write('ZADD', K_DELAYED, later)
count('enqueued', added_count)
wake(#ready / 2)
return added
