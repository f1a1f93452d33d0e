-- reap: move expired leases back to the ready queue, atomically and bounded.
-- include: base, groups, tasks, scopes, notices, successors
-- KEYS[1..FIXED_KEYS]  the agent's fixed keys (the key header, scripts.py)
-- ARGV[1] now in ms ('' = server TIME)   ARGV[2] at most this many per call
-- Safe with several reapers at once: each id leaves the lease set exactly once.
-- Also promotes due delayed tasks and forgets finished ids past their dedupe window (same
-- bound), so an idle agent's retries still move and its finished set does not grow.
-- ARGV[3] outbox grace ms: notices older than this were not delivered by the worker that
--   wrote them (it died, or Redis failed it): they are returned to be delivered (and
--   forgotten) by the caller. Delivery is idempotent, so a late worker's copy is harmless.
-- Returns: {reaped, promoted, field1, notice1, ...}
local now = now_ms(ARGV[1])
local limit = tonumber(ARGV[2])
local grace = tonumber(ARGV[3] or '5000')
local reaped = reap_expired(now, limit)
local promoted = promote_due(now, limit)
expire_finished(now, limit)
promote_ended(now)  -- a lease a key's successor cancelled ended here (reap_expired)
wake(reaped + promoted)
local out = {reaped, promoted}
standing(K_OUTBOX, 'hash')
local pending = redis.call('HLEN', K_OUTBOX)
if pending > 0 then
  local flat
  if pending <= limit then
    flat = redis.call('HGETALL', K_OUTBOX)
  else
    flat = redis.call('HSCAN', K_OUTBOX, 0, 'COUNT', limit)[2]
  end
  for i = 1, #flat, 2 do
    local at = string.find(flat[i + 1], SEP, 1, true)
    local notice = at and string.sub(flat[i + 1], at + 1) or ''
    if not string.match(notice, NOTICE_OK) or not tonumber(string.sub(flat[i + 1], 1, at - 1)) then
      -- someone wrote it: no notice to deliver. The reaper says it once and deletes it.
      count('corrupt', 1)
      out[#out + 1] = flat[i]
      out[#out + 1] = flat[i + 1]
    elseif tonumber(string.sub(flat[i + 1], 1, at - 1)) < now - grace then
      out[#out + 1] = flat[i]
      out[#out + 1] = notice
    end
  end
end
return out
