-- scope_settle: on a cluster, settle holds on scopes (see spend.py), in the budgets slot: the
-- scopes' step of a commit (charge what was spent) or a release (drop), and the outcome of
-- resolve_holds.lua for holds that expired (charge, drop, or keep until the agent's expiry).
-- Each hold is settled on every scope that still has it, once: a scope that no longer has it
-- (settled already, or removed) is skipped. A charge that takes a scope past its limit stands and
-- queues a budget_exceeded event, then the budget_threshold events it reached (see alert; the
-- spend record came with the agent's charge, commit.lua); periods that ended roll first. Run
-- once per op key.
-- KEYS: budgets outbox, op
-- ARGV: now, op ttl (ms), budgets prefix, how many holds, then for each hold its member
--       ("<reservation id>:<amount>:<agent id>:<scopes>") and what to do: the amount to charge,
--       'open:<expiry>' (keep it until then), or '' (drop); then the rolls the client computed
-- Returns {1, 1 when a charge took a scope past its limit else 0} followed by the events
-- queued (see queue_events), or {ROLL, ...}.
-- The last ARGV: the outbox's newest entry the client knows appended ('' for none), trimmed
-- first (see trim_landed).
trim_landed(KEYS[1])
return once(KEYS[2], ARGV[2], function()
  local at, prefix, n = ARGV[1], ARGV[3], tonumber(ARGV[4])
  local budgets, by_name = {}, {}
  local holds = {}
  for i = 5, 4 + 2 * n, 2 do
    local member, verdict = ARGV[i], ARGV[i + 1]
    local rid, held, aid, scopes = string.match(member, '^([^:]*):(%d+):([^:]*):(.*)$')
    local hold = {member = member, verdict = verdict, rid = rid, held = tonumber(held), agent = aid,
      scopes = {}}
    for name in string.gmatch(scopes, '[^,]+') do
      local b = by_name[name]
      if b == nil then
        b = scope_budget(prefix, name) or false
        by_name[name] = b
      end
      if b then
        hold.scopes[#hold.scopes + 1] = b
        if verdict ~= '' and not string.find(verdict, '^open:') and not b.listed then
          b.listed = true
          budgets[#budgets + 1] = b
        end
      end
    end
    holds[#holds + 1] = hold
  end
  local need = rolls_needed(budgets, tonumber(at), 5 + 2 * n)
  if need then return need end
  local events, exceeded = {}, 0
  write_rolls(budgets, '', at, events, nil)
  for _, hold in ipairs(holds) do
    local open = string.match(hold.verdict, '^open:(.*)$')
    local charged = {}
    for _, b in ipairs(hold.scopes) do
      if open then
        -- Open at the agent by its master's clock: kept, and asked about again once it expires
        -- here too (at least a second from now, should this master's clock run ahead).
        redis.call('ZADD', b.holds, 'XX', num(math.max(tonumber(open), server_now() + 1)), hold.member)
      elseif redis.call('ZREM', b.holds, hold.member) == 1 and hold.verdict ~= '' then
        local actual = tonumber(hold.verdict)
        b.spent = b.spent + actual
        redis.call('HINCRBY', b.key, 'spent_micros', hold.verdict)
        charged[#charged + 1] = b
        if b.limit and b.spent > b.limit then
          exceeded = 1
          events[#events + 1] = overspent(hold.agent, at, b, actual, hold.held, hold.rid)
        end
      end
    end
    for _, b in ipairs(charged) do alert(b, hold.agent, at, events) end
  end
  return queue_events(KEYS[1], events, {1, exceeded})
end)
