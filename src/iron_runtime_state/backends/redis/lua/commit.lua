-- commit: settle a hold by charging what was really spent (micro-units) to the agent and to the
-- scopes the hold touched that still hold it, even past a limit. The charge queues the ledger's
-- spend record (see spend_record) in the group's outbox, then a budget_exceeded event for each
-- budget taken past its limit, then the budget_threshold events it reached (see alert), all in
-- this script (the agent's, then each scope's, in order). The agent's holds that lapsed
-- unsettled go first, each with its hold_expired event (see expire_holds), even when this hold is
-- not open; then periods that ended roll.
-- Run once per op key (see `once`), so a call resent after a lost reply is not applied twice.
-- On a cluster (budgets prefix '') only the agent is settled here; for a hold with scopes the
-- commit is recorded under the committed key (kept marker ttl ms) until the client has settled
-- the scopes with scope_settle.lua, so that a scope whose hold expires meanwhile still learns of
-- it (see spend.py); the spend record, written here, names the hold's scopes.
-- KEYS: agent, stats, holds, finished, outbox, op, committed
-- ARGV: the agent's hold member, actual, now, agent_id, reservation id, amount held, op ttl (ms),
--       budgets prefix ('' on a cluster), marker ttl (ms), the hold's scopes (comma-separated,
--       '' for none), note (JSON, '' for none), then the rolls the client computed (see
--       given_rolls)
-- Returns {exceeded (1 or 0), state (see state_reply)} followed by the events queued (see
-- queue_events); {-3} when the hold is not open (settled, expired or never made), followed by
-- the hold_expired events queued, {-1} when the
-- agent does not exist, {LEGACY}, {TOO_BIG, scope, total} and {ROLL, ...}.
-- The last ARGV: the outbox's newest entry the client knows appended ('' for none), trimmed
-- first (see trim_landed).
trim_landed(KEYS[5])
return once(KEYS[6], ARGV[7], function()
  local agent, holds, member, aid, at = KEYS[1], KEYS[3], ARGV[1], ARGV[4], ARGV[3]
  local t = server_now()
  local expires_at = redis.call('ZSCORE', holds, member)
  local f = redis.call('HMGET', agent, unpack(AGENT_FIELDS))
  local lapse = {holds = holds, late = f[2] and lapsed(holds, t) or {}, prefix = ARGV[8]}
  if not expires_at or tonumber(expires_at) <= t then
    -- Not open; the agent's lapsed holds (this one too, if it lapsed) still go, with their events.
    local events = {}
    expire_holds(lapse, aid, at, events)
    return queue_events(KEYS[5], events, {-3})
  end
  if not f[1] then return {-1} end
  if not f[2] then return {LEGACY} end
  local actual = tonumber(ARGV[2])
  local me = agent_budget(agent, f)
  local budgets, split = {me}, ARGV[8] == ''
  local scoped = ARGV[5] .. ':' .. ARGV[6] .. ':' .. aid .. ':' .. ARGV[10]
  if not split then
    for name in string.gmatch(ARGV[10], '[^,]+') do
      local b = scope_budget(ARGV[8], name)
      if b and redis.call('ZSCORE', b.holds, scoped) then budgets[#budgets + 1] = b end
    end
  end
  local need = rolls_needed(budgets, tonumber(at), 12)
  if need then return need end
  local big, total = too_big(budgets, actual, false)
  if big then return {TOO_BIG, big.name, int(total)} end
  local events = {}
  expire_holds(lapse, aid, at, events)
  write_rolls(budgets, aid, at, events, KEYS[2])
  f[9] = me.start ~= '' and me.start
  redis.call('ZREM', holds, member)
  local names = {}
  for i = 2, #budgets do names[#names + 1] = budgets[i].name end
  events[#events + 1] = spend_record(aid, at, actual, split and ARGV[10] or table.concat(names, ','),
    f[5], ARGV[5], ARGV[11])
  local exceeded = 0
  for _, b in ipairs(budgets) do
    if b.holds then redis.call('ZREM', b.holds, scoped) end
    b.spent = b.spent + actual
    redis.call('HINCRBY', b.key, 'spent_micros', ARGV[2])
    if b.limit and b.spent > b.limit then
      exceeded = 1
      events[#events + 1] = overspent(aid, at, b, actual, tonumber(ARGV[6]), ARGV[5])
    end
  end
  for _, b in ipairs(budgets) do alert(b, aid, at, events) end
  redis.call('HSET', agent, 'changed_at', at)
  redis.call('HINCRBY', KEYS[2], 'spent_micros', ARGV[2])
  index_finished(KEYS[4], aid, f[1], f[1], at)
  if split and ARGV[10] ~= '' then redis.call('SET', KEYS[7], ARGV[2], 'PX', ARGV[9]) end
  f[2] = int(me.spent)
  return queue_events(KEYS[5], events, state_reply(exceeded, f))
end)
