-- resolve_ops: on a cluster, what became of spends whose pending hold on the agent expired
-- (see spend.py): the scopes' step (scope_spend.lua) keeps its reply under its op key, here in the
-- budgets slot. A step that never ran gets a LATE reply under its key now, so that if it comes
-- after all it changes nothing: the spend is then dropped on both sides.
-- KEYS: the op keys of the spends' scope steps
-- ARGV: how long a LATE reply is kept (ms)
-- Returns for each spend 1 when its scopes were charged, else 0.
local verdicts = {}
for i = 1, #KEYS do
  local first = redis.call('GET', KEYS[i])
  if first then
    verdicts[i] = cmsgpack.unpack(first)[1] == 1 and 1 or 0
  else
    redis.call('SET', KEYS[i], cmsgpack.pack({LATE}), 'PX', ARGV[1])
    verdicts[i] = 0
  end
end
return verdicts
