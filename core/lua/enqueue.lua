-- enqueue: add a batch of tasks of one agent type, atomically.
-- KEYS[1..12]  the agent's fixed keys (see _prelude.lua)
-- KEYS[13..]   result keys of tasks with a deterministic id (done-dedupe), by index
-- ARGV[1]      max payload bytes
-- ARGV[2]      now in ms ('' = server TIME)
-- ARGV[3]      n, then n groups of 5: id, score, delay_ms, task_json, result_key_index (0 = none)
-- Returns: a list of n integers, 1 = added, 0 = duplicate (already queued/leased/delayed/dead,
-- or done within the result TTL). A payload over the limit fails the whole batch, unwritten.
local max_bytes = tonumber(ARGV[1])
local now = now_ms(ARGV[2])
local n = tonumber(ARGV[3])
local base = 3
for i = 0, n - 1 do
  local json = ARGV[base + i * 5 + 4]
  if #json > max_bytes then
    return redis.error_reply('ERR task ' .. ARGV[base + i * 5 + 1] .. ' is ' .. #json ..
      ' bytes, over the limit of ' .. max_bytes .. ' bytes')
  end
end
local added = {}
local count, ready = 0, 0
for i = 0, n - 1 do
  local o = base + i * 5
  local id, score, delay_ms, json, rk = ARGV[o + 1], ARGV[o + 2], tonumber(ARGV[o + 3]), ARGV[o + 4], tonumber(ARGV[o + 5])
  local duplicate = redis.call('HEXISTS', K_TASKS, id) == 1
  if not duplicate and rk > 0 then
    duplicate = redis.call('EXISTS', KEYS[FIXED_KEYS + rk]) == 1
  end
  if duplicate then
    added[i + 1] = 0
  else
    redis.call('HSET', K_TASKS, id, json)
    redis.call('HSET', K_SCORES, id, score)
    if delay_ms > 0 then
      redis.call('ZADD', K_DELAYED, now + delay_ms, id)
    else
      redis.call('ZADD', K_QUEUE, score, id)
      ready = ready + 1
    end
    added[i + 1] = 1
    count = count + 1
  end
end
if count > 0 then redis.call('HINCRBY', K_STATS, 'enqueued', count) end
wake(ready)
return added
