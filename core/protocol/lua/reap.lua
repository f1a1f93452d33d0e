-- reap: move expired leases back to the ready queue, atomically and bounded.
-- KEYS[1..FIXED_KEYS]  the agent's fixed keys (see _prelude.lua)
-- ARGV[1] now in ms ('' = server TIME)   ARGV[2] at most this many per call
-- Safe with several reapers at once: each id leaves the lease set exactly once.
-- Also promotes due delayed tasks and forgets finished ids past their dedupe window (same
-- bound), so an idle agent's retries still move and its finished set does not grow.
-- Returns: {reaped, promoted}
local now = now_ms(ARGV[1])
local limit = tonumber(ARGV[2])
local reaped = reap_expired(now, limit)
local promoted = promote_due(now, limit)
expire_finished(now, limit)
wake(reaped + promoted)
return {reaped, promoted}
