-- nack: a batch of leased tasks failed; retry later or dead-letter, token-checked, atomically.
-- include: base, groups, tasks, scopes, notices, successors
-- KEYS[1..FIXED_KEYS]  the agent's fixed keys (the key header, scripts.py)
-- ARGV[1] now in ms ('' = server TIME)
-- ARGV[2] n, then n groups of 5: id, token, max_attempts, retry_delay_ms, reason_json
--   retry_delay_ms < 0 means dead-letter now (corrupt task, hop limit, ...).
-- A failure counts one attempt; at max_attempts the task is dead-lettered with the reason,
-- otherwise it waits in the delayed set (the caller computed backoff and jitter).
-- A dead-lettered task's end goes to its run or join (notice_dead): applied here when
-- that scope lives in this slot, else written to the outbox and returned for the caller
-- to deliver at once (the reaper delivers it otherwise). A key's successor waiting for a
-- dead-lettered task takes its id; a task its successor cancelled ends cancelled instead.
-- Returns: {stale ids..., '|', dead ids..., '|', outbox field, notice, ...}
local now = now_ms(ARGV[1])
local n = tonumber(ARGV[2])
local stale, dead = {}, {}
local failed, retried = 0, 0
for i = 0, n - 1 do
  local o = 2 + i * 5
  local id, token, max_attempts, delay_ms, reason = ARGV[o + 1], ARGV[o + 2], tonumber(ARGV[o + 3]), tonumber(ARGV[o + 4]), ARGV[o + 5]
  local holds = redis.call('HGET', K_TOKENS, id) == token
  if holds and stopping(id) then
    stop_lease(id, now)  -- cancelled for a key's successor: it ends so, never retried
  elseif holds then
    failed = failed + 1
    local so_far, why = count_in('failures', redis.call('HGET', K_FAILURES, id), id)
    if not so_far then
      bury_corrupt(id, now, K_FAILURES, why)
      dead[#dead + 1] = id
    elseif delay_ms < 0 or so_far + 1 >= max_attempts then
      redis.call('HSET', K_FAILURES, id, so_far + 1)
      bury(id, now, reason)
      dead[#dead + 1] = id
    else
      redis.call('ZREM', K_LEASES, id)
      lease_ended(id)
      redis.call('HDEL', K_TOKENS, id)
      redis.call('HSET', K_FAILURES, id, so_far + 1)
      redis.call('ZADD', K_DELAYED, now + delay_ms, id)
      retried = retried + 1
    end
  else
    stale[#stale + 1] = id
  end
end
promote_ended(now)
count('failed', failed)
count('retried', retried)
count('stale_acks', #stale)
stale[#stale + 1] = '|'
for _, id in ipairs(dead) do stale[#stale + 1] = id end
stale[#stale + 1] = '|'
for _, item in ipairs(OUTBOXED) do stale[#stale + 1] = item end  -- see emit_notice
return stale
