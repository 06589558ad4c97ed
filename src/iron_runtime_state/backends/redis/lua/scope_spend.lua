-- scope_spend: on a cluster, the scopes' step of a spend or a hold (see spend.py), in the budgets
-- slot, after the agent's step passed: charge the amount to each scope (action 'spend'), or hold
-- it on each (action 'reserve', member "<reservation id>:<amount>:<agent id>:<scopes>" scored by
-- the agent's hold expiry), unless it would take one past its limit (spent + holds + amount, in
-- the order the agent lists them). Periods that ended roll first. A spend queues the
-- budget_threshold events it reached on each scope (see alert; the agent's spend record and its
-- own thresholds come with its charge, settle_pending.lua) in the budgets outbox, in this script,
-- so they reach the trail exactly once whatever happens to the client after it. A refusal charges
-- nothing and queues its budget_exceeded event in the budgets outbox. Holds that expired are settled first
-- (RESOLVE): their other half lives in another slot.
-- A spend's step keeps its reply under its op key for the marker ttl: resolve_ops.lua reads it
-- there when the agent's pending hold expired before the client settled it. A spend's step that
-- comes after its pending hold expired (the fence, by this server's clock) changes nothing.
-- KEYS: budgets outbox, op
-- ARGV: action, amount, now, agent_id, op ttl (ms), budgets prefix, fence ('' for none), hold
--       member (reserve) or '', hold expiry (reserve) or '', the scopes (comma-separated), then
--       the rolls the client computed (see given_rolls)
-- Returns {1} when charged or held, {0, the scope that refused (budget_row)} when refused, each
-- followed by the events queued (see queue_events); {NO_SCOPE, name}, {TOO_BIG, scope, total},
-- {LATE}, {ROLL, ...} and {RESOLVE, expired scope hold members...}.
-- The last ARGV: the outbox's newest entry the client knows appended ('' for none), trimmed
-- first (see trim_landed).
trim_landed(KEYS[1])
return once(KEYS[2], ARGV[5], function()
  local action, amount, aid, at, prefix = ARGV[1], tonumber(ARGV[2]), ARGV[4], ARGV[3], ARGV[6]
  local t = server_now()
  if ARGV[7] ~= '' and t > tonumber(ARGV[7]) then return {LATE} end
  local budgets, missing = add_scopes({}, prefix, ARGV[10])
  if not budgets then return {NO_SCOPE, missing} end
  local expired, seen = {RESOLVE}, {}
  for _, b in ipairs(budgets) do
    local late
    b.held, late = all_holds(b.holds, t)
    for _, m in ipairs(late) do
      if not seen[m] then
        seen[m] = true
        expired[#expired + 1] = m
      end
    end
  end
  if #expired > 1 then return expired end
  local need = rolls_needed(budgets, tonumber(at), 11)
  if need then return need end
  local events = {}
  local refused = refusing(budgets, amount)
  if refused then
    write_rolls(budgets, aid, at, events, nil)
    events[#events + 1] = refusal(action, aid, at, refused, amount)
    return queue_events(KEYS[1], events, {0, budget_row(refused)})
  end
  local big, total = too_big(budgets, amount, action == 'reserve')
  if big then return {TOO_BIG, big.name, int(total)} end
  write_rolls(budgets, aid, at, events, nil)
  for _, b in ipairs(budgets) do
    if action == 'spend' then
      b.spent = b.spent + amount
      redis.call('HINCRBY', b.key, 'spent_micros', ARGV[2])
      alert(b, aid, at, events)
    else
      redis.call('ZADD', b.holds, ARGV[9], ARGV[8])
    end
  end
  return queue_events(KEYS[1], events, {1})
end)
