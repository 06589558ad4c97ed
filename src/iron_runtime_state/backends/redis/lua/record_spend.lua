-- record_spend: charge an amount (micro-units) to an agent and to each budget scope it draws on,
-- unless it would take one of them past its limit (spent + open holds + amount, the agent first,
-- then the scopes in the order it lists them). The agent's holds that lapsed unsettled go first,
-- each with its hold_expired event (see expire_holds); periods that ended roll (see plan_rolls).
-- A charge queues the ledger's spend record (see spend_record) in the group's outbox, then the
-- budget_threshold events it reached (see alert: the agent's, then each scope's); a refusal charges
-- nothing but queues its budget_exceeded event. Run once per op key (see `once`), so a call resent
-- after a lost reply is not applied twice.
-- On a standalone server the scopes are read and charged here too (their keys are named from
-- the budgets prefix), in the same script. On a cluster (prefix '') they live in another slot:
-- an agent with scopes gets a pending hold of the amount, whose member carries what the spend
-- record needs ("<op id>:<amount>:<now>\n<scopes>\n<note>"), and the client goes on with
-- scope_spend.lua and settle_pending.lua (see spend.py), which writes the record.
-- KEYS: agent, stats, holds, pending, outbox, op
-- ARGV: amount, now, agent_id, op ttl (ms), budgets prefix ('' on a cluster), pending hold ttl
--       (s), op id, note (JSON, '' for none), then the rolls the client computed (see given_rolls)
-- Returns {1, state (see state_reply), reserved} when charged; {0, state, reserved, the scope
-- that refused (budget_row) or false for the agent} when refused; {2, state, reserved, pending
-- hold expiry, pending hold member} when the scopes come next (cluster); each followed by the
-- events queued (see queue_events). {-1}: no such agent; {-2, status}: not running; {NO_SCOPE,
-- name}; {TOO_BIG, scope ('' for the agent), total}; {LEGACY}; {ROLL, ...} (see plan_rolls);
-- {RESOLVE, expired pending holds...} (cluster).
-- The last ARGV: the outbox's newest entry the client knows appended ('' for none), trimmed
-- first (see trim_landed).
trim_landed(KEYS[5])
return once(KEYS[6], ARGV[4], function()
  local agent, stats, aid, at = KEYS[1], KEYS[2], ARGV[3], ARGV[2]
  local amount, now = tonumber(ARGV[1]), tonumber(at)
  local stop, f, me, budgets = spender(agent, KEYS[3], KEYS[4], ARGV[5], now, 9)
  if stop then return stop end
  local refused = refusing(budgets, amount)
  if refused then
    return refuse('spend', refused, f, me, budgets, amount, aid, at, stats, KEYS[5])
  end
  local big, total = too_big(budgets, amount, false)
  if big then return {TOO_BIG, big.name, int(total)} end
  local events = {}
  expire_holds(me.lapsed, aid, at, events)
  write_rolls(budgets, aid, at, events, stats)
  f[9] = me.start ~= '' and me.start
  local reply
  if ARGV[5] == '' and f[6] then
    local expiry = server_now() + tonumber(ARGV[6])
    local member = ARGV[7] .. ':' .. ARGV[1] .. ':' .. at .. '\n' .. f[6] .. '\n' .. ARGV[8]
    redis.call('ZADD', KEYS[4], num(expiry), member)
    f[2] = int(me.spent)
    reply = state_reply(2, f)
    reply[13] = num(expiry)
    reply[14] = member
  else
    me.spent = me.spent + amount
    f[2] = int(me.spent)
    redis.call('HSET', agent, 'spent_micros', f[2], 'changed_at', at)
    for i = 2, #budgets do
      budgets[i].spent = budgets[i].spent + amount
      redis.call('HINCRBY', budgets[i].key, 'spent_micros', ARGV[1])
    end
    redis.call('HINCRBY', stats, 'spent_micros', ARGV[1])
    events[#events + 1] = spend_record(aid, at, amount, #budgets > 1 and f[6] or '', f[5], '', ARGV[8])
    for _, b in ipairs(budgets) do alert(b, aid, at, events) end
    reply = state_reply(1, f)
  end
  reply[12] = int(me.held)
  return queue_events(KEYS[5], events, reply)
end)
