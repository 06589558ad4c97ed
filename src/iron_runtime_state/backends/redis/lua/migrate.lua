-- migrate: convert agents of one group stored by 0.4/0.5 (floats) to whole micro-units (layout
-- 2), with the group's statistics and the agents' holds. The client read each agent's float
-- fields and converted them exactly in Python (money.to_micros); an agent is converted only if it
-- still holds what was read and is not converted yet, so several migrations at once, or one
-- repeated after a crash, convert each agent once.
-- KEYS: the group's stats, then for each agent its hash and its holds
-- ARGV: for each agent: agent_id, budget_spent and budget_limit as read ('' for none), spent and
--       limit in micro-units ('' for none), how many holds, then each hold's member as read and
--       as converted
-- Returns {agents converted, ids of agents that changed since they were read}.
local stats = KEYS[1]
local converted, changed = 0, {}
local i, k = 1, 2
while i <= #ARGV do
  local id, spent_text, limit_text, spent, limit = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3],
    ARGV[i + 4]
  local n = tonumber(ARGV[i + 5])
  local agent, holds = KEYS[k], KEYS[k + 1]
  local f = redis.call('HMGET', agent, 'status', 'spent_micros', 'budget_spent', 'budget_limit')
  if f[1] and not f[2] then
    if f[3] ~= spent_text or (f[4] or '') ~= limit_text then
      changed[#changed + 1] = id
    else
      redis.call('HSET', agent, 'spent_micros', spent)
      if limit ~= '' then redis.call('HSET', agent, 'limit_micros', limit) end
      redis.call('HDEL', agent, 'budget_spent', 'budget_limit')
      redis.call('HINCRBY', stats, 'spent_micros', spent)
      add_float(stats, 'budget_spent', -tonumber(spent_text))
      for h = i + 6, i + 5 + 2 * n, 2 do
        local score = redis.call('ZSCORE', holds, ARGV[h])
        if score then
          redis.call('ZREM', holds, ARGV[h])
          redis.call('ZADD', holds, score, ARGV[h + 1])
        end
      end
      converted = converted + 1
    end
  end
  i = i + 6 + 2 * n
  k = k + 2
end
return {converted, changed}
