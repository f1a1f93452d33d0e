-- dead_purge: delete dead-lettered tasks and their payloads for good, atomically.
-- KEYS[1..12]  the agent's fixed keys (see _prelude.lua)
-- ARGV[1] limit, ARGV[2..] ids (none = the oldest `limit` dead tasks)
-- Returns: the number purged.
local limit = tonumber(ARGV[1])
local ids = {}
if #ARGV > 1 then
  for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end
else
  ids = redis.call('ZRANGE', K_DEAD, 0, limit - 1)
end
local purged = 0
for _, id in ipairs(ids) do
  if redis.call('ZREM', K_DEAD, id) == 1 then
    redis.call('HDEL', K_DEAD_REASONS, id)
    forget(id)
    purged = purged + 1
  end
end
return purged
