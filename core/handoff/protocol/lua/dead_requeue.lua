-- dead_requeue: give dead-lettered tasks a fresh start in the ready queue, atomically.
-- include: base, groups, tasks, scopes, notices, successors
-- KEYS[1..FIXED_KEYS]  the agent's fixed keys (the key header, scripts.py)
-- ARGV[1] limit, ARGV[2..] ids (none = the oldest `limit` dead tasks)
-- Returns: the ids requeued.
local ids = dead_selection(ARGV)
local now = now_ms('')
local moved = {}
for _, id in ipairs(ids) do
  if redis.call('ZREM', K_DEAD, id) == 1 then
    redis.call('HDEL', K_DEAD_REASONS, id)
    redis.call('HDEL', K_DELIVERIES, id)
    redis.call('HDEL', K_FAILURES, id)
    if requeue(id, now) then moved[#moved + 1] = id end
  end
end
wake(#moved)
return moved
