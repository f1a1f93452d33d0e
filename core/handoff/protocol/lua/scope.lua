-- scope: apply notices to runs and joins whose scope lives in this agent's slot.
-- include: base, groups, tasks, scopes, notices, successors
-- KEYS[1..FIXED_KEYS]  the agent's fixed keys (the key header, scripts.py)
-- [KEYS[FIXED_KEYS + 1]  the outbox the notices were written to: one server only]
-- ARGV[1] now in ms ('' = server TIME)
-- Without an outbox key: ARGV[2..] notices (see apply_notice), applied.
-- With it: ARGV[2..] pairs of outbox field and notice: a notice is applied only if its
--   field is in that outbox, and the field is deleted. On one server (no slots) this call
--   rides in the ack's own pipeline, right behind it: what a stale or failed ack did not
--   write to its outbox is not applied. (On a cluster the outbox is another slot: the
--   caller delivers after the ack, and forgets the fields later.)
-- Idempotent: a notice applied twice (a retried call, the reaper delivering what a worker
-- also delivered) changes nothing the second time. A join whose last branch ends here
-- enqueues its then-task in this same call.
-- Returns: {the number of notices applied, ['|', outbox field, notice, ...]}: what applying
-- them sent on to scopes in other slots (a join that fired and ended at once: cancelled,
-- or dead-lettered as corrupt), for the caller to deliver in turn.
local now = now_ms(ARGV[1])
local source = KEYS[FIXED_KEYS + 1]
local applied = 0
if source then
  for i = 2, #ARGV, 2 do
    if redis.call('HDEL', source, ARGV[i]) == 1 then
      apply_notice(ARGV[i + 1], now)
      applied = applied + 1
    end
  end
else
  for i = 2, #ARGV do apply_notice(ARGV[i], now) end
  applied = #ARGV - 1
end
return with_outboxed({applied})
