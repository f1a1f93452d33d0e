-- dead_purge: delete dead-lettered tasks and their payloads for good, atomically.
-- include: base, groups, tasks, scopes, notices, successors
-- KEYS[1..FIXED_KEYS]  the agent's fixed keys (the key header, scripts.py)
-- ARGV[1] limit, ARGV[2..] ids (none = the oldest `limit` dead tasks)
-- Returns: the number purged.
local ids = dead_selection(ARGV)
local purged = 0
for _, id in ipairs(ids) do
  if redis.call('ZREM', K_DEAD, id) == 1 then
    redis.call('HDEL', K_DEAD_REASONS, id)
    forget(id)
    redis.call('DEL', run_key('scope', id), run_key('ends', id))  -- a then-task's join
    purged = purged + 1
  end
end
return purged
