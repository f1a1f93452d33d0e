-- enqueue_ready: add one plain task (ready now: no delay, key, parent, deadline or group),
-- the single enqueue a web request makes. What enqueue.lua does for such a task, with no
-- prelude and only the keys it touches: a script's server time is mostly its prelude's
-- definitions, and a single enqueue's whole cost is one round trip plus that time.
local K_TASKS, K_SCORES, K_QUEUE, K_STATS, K_WAKE = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
-- ARGV: max payload bytes, id, score, task_json.
-- Returns {1} added, {0} duplicate (the id is already queued, leased, delayed or dead).
local max_bytes, id, score, json = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
if #json > max_bytes then
  return redis.error_reply('ERR task ' .. id .. ' is ' .. #json .. ' bytes, over the limit of ' ..
    max_bytes .. ' bytes')
end
if redis.call('HSETNX', K_TASKS, id, json) == 0 then return {0} end
redis.call('HSET', K_SCORES, id, score)
redis.call('ZADD', K_QUEUE, score, id)
local counted = redis.pcall('HINCRBY', K_STATS, 'enqueued', 1)  -- (as count() does)
if type(counted) == 'table' and counted.err then redis.pcall('HSET', K_STATS, 'enqueued', 1) end
-- (as wake(1) does)
if redis.call('LPUSH', K_WAKE, '1') > 128 then redis.call('LTRIM', K_WAKE, 0, 127) end
return {1}
