-- settle_pending: on a cluster, settle pending holds of an agent's spends (see record_spend.lua):
-- each one whose scopes were charged is charged to the agent, with the ledger's spend record (see
-- spend_record: the member carries the spend's time, the scopes charged and the note) and the
-- agent's budget_threshold events (see alert) queued in the group's outbox in this script; the
-- others are dropped. Safe to repeat: a hold settled already is not there any more. A member a
-- 0.6 process left ("<op id>:<amount>") is charged without a record (0.6 kept no ledger).
-- KEYS: agent, stats, pending, outbox
-- ARGV: now, agent_id, then for each hold its member and '1' (charge) or '0' (drop)
-- Returns {1, state (see state_reply)} followed by the events queued (see queue_events), or {-1}
-- when the agent no longer exists.
-- The last ARGV: the outbox's newest entry the client knows appended ('' for none), trimmed
-- first (see trim_landed).
trim_landed(KEYS[4])
local agent, stats, pending, at, aid = KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2]
local f = redis.call('HMGET', agent, unpack(AGENT_FIELDS))
local me = f[1] and agent_budget(agent, f)
local events = {}
for i = 3, #ARGV - 2, 2 do
  local member = ARGV[i]
  if redis.call('ZREM', pending, member) == 1 and ARGV[i + 1] == '1' and me then
    local amount = hold_amount(member)
    redis.call('HINCRBY', agent, 'spent_micros', amount)
    redis.call('HINCRBY', stats, 'spent_micros', amount)
    redis.call('HSET', agent, 'changed_at', at)
    me.spent = me.spent + amount
    local when, scopes, note = string.match(member, '^[^:]*:%d+:([^\n]*)\n([^\n]*)\n(.*)$')
    if when then
      events[#events + 1] = spend_record(aid, when, amount, scopes, f[5], '', note)
      alert(me, aid, when, events)
    end
  end
end
if not me then return {-1} end
f[2] = int(me.spent)
return queue_events(KEYS[4], events, state_reply(1, f))
