-- reserve: hold an amount (micro-units) on an agent and on each budget scope it draws on, unless
-- it would take one of them past its limit (spent + open holds + amount, the agent first, then
-- its scopes in order). The agent's holds that lapsed go first, each with its hold_expired event
-- (see expire_holds), and periods that ended roll. A hold is a
-- member "<reservation id>:<amount>[:<scopes>]" of the agent's holds set, and
-- "<reservation id>:<amount>:<agent id>:<scopes>" of each scope's, scored by its expiry (the
-- server's clock). A scope's holds key expires a second after its last hold, so nothing leaks;
-- an agent's stays until its lapsed holds are reported (or the agent is removed). A refusal
-- queues its budget_exceeded event in the group's outbox. Run once per op key (see `once`).
-- On a cluster (budgets prefix '') only the agent is held here; an agent with scopes replies 2
-- and the client holds the scopes with scope_spend.lua (see spend.py).
-- KEYS: agent, stats, holds, pending, outbox, op
-- ARGV: amount, ttl (s), reservation id, now, agent_id, op ttl (ms), budgets prefix ('' on a
--       cluster), then the rolls the client computed (see given_rolls)
-- Returns {1, expires_at, scopes (false: none)} when held, {2, expires_at, state (see state_reply), reserved} when
-- the scopes come next (cluster), {0, state (see state_reply), reserved, the scope that refused (budget_row) or false
-- for the agent} when refused, each followed by the events queued (see queue_events); and the
-- codes of record_spend.lua.
-- The last ARGV: the outbox's newest entry the client knows appended ('' for none), trimmed
-- first (see trim_landed).
trim_landed(KEYS[5])
return once(KEYS[6], ARGV[6], function()
  local agent, holds, aid, at = KEYS[1], KEYS[3], ARGV[5], ARGV[4]
  local amount, now = tonumber(ARGV[1]), tonumber(at)
  local stop, f, me, budgets = spender(agent, holds, KEYS[4], ARGV[7], now, 8)
  if stop then return stop end
  local refused = refusing(budgets, amount)
  if refused then
    return refuse('reserve', refused, f, me, budgets, amount, aid, at, KEYS[2], KEYS[5])
  end
  local big, total = too_big(budgets, amount, true)
  if big then return {TOO_BIG, big.name, int(total)} end
  local events = {}
  expire_holds(me.lapsed, aid, at, events)
  write_rolls(budgets, aid, at, events, KEYS[2])
  f[9] = me.start ~= '' and me.start
  local t = server_now()
  local expires_at = t + tonumber(ARGV[2])
  local text = num(expires_at)
  local member = ARGV[3] .. ':' .. ARGV[1]
  if f[6] then member = member .. ':' .. f[6] end
  for _, b in ipairs(budgets) do
    local key = b.holds or holds
    redis.call('ZADD', key, text, b.holds and (ARGV[3] .. ':' .. ARGV[1] .. ':' .. aid .. ':' .. f[6]) or member)
    if b.holds then
      keep_until_last(key)
    else
      -- An agent's holds set keeps its lapsed holds until a write reports them; one an older
      -- version gave an expiry must not take the new hold with it.
      redis.call('PERSIST', key)
    end
  end
  if ARGV[7] == '' and f[6] then
    local reply = state_reply(2, f)
    table.insert(reply, 2, text)
    reply[13] = int(me.held)
    return queue_events(KEYS[5], events, reply)
  end
  return queue_events(KEYS[5], events, {1, text, f[6]})
end)
