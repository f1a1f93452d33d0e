-- follow: where a run stands, for client.result(follow=True); registers a waiter if open
-- include: base, groups, tasks, scopes, notices, successors
-- (WATCHED, see lua/lib/: the run's root until now + ARGV[2] ms).
-- KEYS[1..FIXED_KEYS]  the root agent's fixed keys (the key header, scripts.py)
-- ARGV[1] the run's root id   ARGV[2] how long the waiter flag lives, ms
-- Returns one of:
--   {'ended', dropped, ends}           the run ended: its ends in the order they arrived
--                                       (each end's JSON followed by a comma)
--   {'single', record_json}             the root ended without handing off: its record
--   {'dead', reason_json}               the root was dead-lettered without handing off
--   {'wait'}                            still running: block on <base>:ended:<root>
--   {'unknown'}                         no such task (never enqueued, or long gone)
local root = ARGV[1]
local sk = run_key('scope', root)
local function watch()
  local now = now_ms('')
  redis.call('ZREMRANGEBYSCORE', WATCHED, '-inf', now)  -- waiters gone (never +inf marks)
  local until_ms = now + tonumber(ARGV[2])
  local known = tonumber(redis.call('ZSCORE', WATCHED, root) or '0')
  if until_ms > known then redis.call('ZADD', WATCHED, until_ms, root) end
end
if redis.call('TYPE', sk).ok == 'hash' then  -- (one overwritten ends at its next notice)
  if redis.call('HEXISTS', sk, 'done') == 1 then
    return {'ended', redis.call('HGET', sk, 'dropped') or '0',
      redis.call('GET', run_key('ends', root)) or ''}
  end
  watch()
  return {'wait'}
end
local record = redis.call('GET', run_key('result', root))
if record then
  -- (a root that handed off made its run's scope in the same ack, and the scope is kept
  -- at least as long as the record)
  return {'single', record}
end
if redis.call('ZSCORE', K_DEAD, root) then
  return {'dead', redis.call('HGET', K_DEAD_REASONS, root) or '{}'}
end
if redis.call('HEXISTS', K_TASKS, root) == 1 then
  watch()
  return {'wait'}
end
return {'unknown'}
