-- index_status: put some agents of one group in the status set of their stored status, and in
-- no other (an agent gone meanwhile in none). Builds the status sets of a namespace written
-- before they existed; safe to repeat, and to run beside writers, which keep the sets too.
-- KEYS: the group's running, stopped and failed sets, then each agent's state hash
-- ARGV: the agents' ids
-- Returns how many agents were indexed.
local sets = status_sets(1)
for i = 1, #ARGV do
  local status = redis.call('HGET', KEYS[i + 3], 'status')
  for name, key in pairs(sets) do
    if name == status then
      redis.call('ZADD', key, 0, ARGV[i])
    else
      redis.call('ZREM', key, ARGV[i])
    end
  end
end
return #ARGV
