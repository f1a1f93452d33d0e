-- follow: where a run stands, for client.result(follow=True); registers a waiter if open.
-- KEYS[1..FIXED_KEYS]  the root agent's fixed keys (see _prelude.lua)
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
if redis.call('EXISTS', sk) == 1 then
  if redis.call('HEXISTS', sk, 'done') == 1 then
    return {'ended', redis.call('HGET', sk, 'dropped') or '0',
      redis.call('GET', run_key('ends', root)) or ''}
  end
  redis.call('SET', run_key('waiting', root), '1', 'PX', tonumber(ARGV[2]))
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
  redis.call('SET', run_key('waiting', root), '1', 'PX', tonumber(ARGV[2]))
  return {'wait'}
end
return {'unknown'}
