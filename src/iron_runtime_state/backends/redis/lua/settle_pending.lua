-- settle_pending: on a cluster, settle pending holds of an agent's spends (see record_spend.lua):
-- each one whose scopes were charged is charged to the agent, the others are dropped. Safe to
-- repeat: a hold settled already is not there any more.
-- KEYS: agent, stats, pending
-- ARGV: now, then for each hold its member ("<op id>:<amount>") and '1' (charge) or '0' (drop)
-- Returns {1, state (see state_reply)}, or {-1} when the agent no longer exists.
local agent, stats, pending, at = KEYS[1], KEYS[2], KEYS[3], ARGV[1]
local exists = redis.call('EXISTS', agent) == 1
for i = 2, #ARGV - 1, 2 do
  if redis.call('ZREM', pending, ARGV[i]) == 1 and ARGV[i + 1] == '1' and exists then
    local amount = hold_amount(ARGV[i])
    redis.call('HINCRBY', agent, 'spent_micros', amount)
    redis.call('HINCRBY', stats, 'spent_micros', amount)
    redis.call('HSET', agent, 'changed_at', at)
  end
end
if not exists then return {-1} end
return state_reply(1, redis.call('HMGET', agent, unpack(AGENT_FIELDS)))
