-- Helpers shared by the scripts. Redis scripts cannot import one another, so
-- scripts.load_scripts() puts in front of each script the definitions below that it uses
-- (each separated from the next by a blank line, with its comment right above it).
--
-- Numbers cross the wire as text: floats are written with the shortest digits that read back as
-- the same double (like Python's repr), and integers that may pass 2^53 (pii counts) are only
-- ever changed with HINCRBY, which is exact to 64 bits.

local LIMIT_TOLERANCE = __LIMIT_TOLERANCE__ -- iron_runtime_state.models.LIMIT_TOLERANCE

local GENESIS_HASH = '__GENESIS_HASH__' -- iron_runtime_state.audit_chain.GENESIS_HASH

local LANDED_KEEP = __LANDED_KEEP__ -- iron_runtime_state.backends.redis.scripts.LANDED_KEEP

local TIME_BLOCK = __TIME_BLOCK__ -- iron_runtime_state.backends.redis.scripts.TIME_BLOCK

-- The shortest text that reads back as exactly x.
local function num(x)
  if x == 0 then return '0' end
  local s = string.format('%.15g', x)
  if tonumber(s) == x then return s end
  s = string.format('%.16g', x)
  if tonumber(s) == x then return s end
  return string.format('%.17g', x)
end

-- An integer as plain digits (tostring switches to exponent notation above 1e14).
local function int(x)
  return string.format('%d', x)
end

-- models.exceeds: whether total passes limit, allowing for binary rounding.
local function exceeds(total, limit)
  return total > limit + LIMIT_TOLERANCE * math.max(1.0, limit)
end

-- The correctly rounded sum of a list of numbers, as Python's math.fsum computes it
-- (Shewchuk's exact partials, then CPython's round-half-even correction).
local function fsum(xs)
  local p = {}
  for _, x in ipairs(xs) do
    local kept = {}
    for _, y in ipairs(p) do
      if math.abs(x) < math.abs(y) then x, y = y, x end
      local hi = x + y
      local lo = y - (hi - x)
      if lo ~= 0 then kept[#kept + 1] = lo end
      x = hi
    end
    kept[#kept + 1] = x
    p = kept
  end
  local n = #p
  if n == 0 then return 0 end
  local hi = p[n]
  local lo = 0
  n = n - 1
  while n > 0 do
    local x = hi
    local y = p[n]
    n = n - 1
    hi = x + y
    lo = y - (hi - x)
    if lo ~= 0 then break end
  end
  if n > 0 and ((lo < 0 and p[n] < 0) or (lo > 0 and p[n] > 0)) then
    local y = lo * 2
    local x = hi + y
    if y == x - hi then hi = x end
  end
  return hi
end

-- The server's clock in seconds. Reservations expire by this one clock, so clients on hosts
-- whose clocks disagree still agree on which holds are open.
local function server_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- Drop the agent's expired holds; return the sum of the open ones and how many there are.
-- holds is a sorted set of "<reservation id>:<amount>" members scored by expiry time.
local function open_holds(holds, now)
  if redis.call('EXISTS', holds) == 0 then return 0, 0 end
  redis.call('ZREMRANGEBYSCORE', holds, '-inf', num(now or server_now()))
  local amounts = redis.call('ZRANGE', holds, 0, -1)
  for i = 1, #amounts do amounts[i] = tonumber(string.match(amounts[i], ':([^:]*)$')) end
  return fsum(amounts), #amounts
end

-- Remove one hold ("<reservation id>:<amount>"); true when it existed and had not expired.
local function take_hold(holds, hold)
  local expires_at = redis.call('ZSCORE', holds, hold)
  if not expires_at then return false end
  redis.call('ZREM', holds, hold)
  return tonumber(expires_at) > server_now()
end

-- Add delta to a float field of a statistics hash.
local function add_float(key, field, delta)
  local current = tonumber(redis.call('HGET', key, field) or '0')
  redis.call('HSET', key, field, num(current + delta))
end

-- Finished agents (stopped, failed) are indexed by their last change, so that purge_agents finds
-- the old ones without reading every agent. Running agents are not in the index.
local function index_finished(finished, agent_id, old_status, new_status, now)
  if new_status ~= 'running' then
    redis.call('ZADD', finished, now, agent_id)
  elseif old_status and old_status ~= 'running' then
    redis.call('ZREM', finished, agent_id)
  end
end

-- Each group keeps its agents' ids per status (a sorted set, score 0, walked by name), so that
-- iter_agent_states(status=...) walks only the matches. sets maps a status to its set's key.
local function index_status(sets, agent_id, old_status, new_status)
  if old_status == new_status then return end
  if old_status then redis.call('ZREM', sets[old_status], agent_id) end
  if new_status then redis.call('ZADD', sets[new_status], 0, agent_id) end
end

-- The status sets of a group, from three consecutive KEYS starting at i.
local function status_sets(i)
  return {running = KEYS[i], stopped = KEYS[i + 1], failed = KEYS[i + 2]}
end

-- The four stored fields of an agent, read after a change, as scripts reply them.
local function stored_fields(agent)
  local f = redis.call('HMGET', agent, 'status', 'budget_spent', 'pii_detections', 'budget_limit')
  return f[1], f[2], f[3], f[4] or ''
end

-- Remove an agent whose stored {status, budget_spent, pii_detections} are f, with its holds
-- (k: its keys, k.status its group's status sets).
-- A group left empty drops its statistics hash, so no rounding residue outlives its agents.
local function drop_agent(k, agent_id, f)
  redis.call('DEL', k.agent, k.holds)
  redis.call('ZREM', k.ids, agent_id)
  redis.call('ZREM', k.finished, agent_id)
  index_status(k.status, agent_id, f[1], nil)
  redis.call('HINCRBY', k.stats, f[1], -1)
  if f[3] ~= '0' then redis.call('HINCRBY', k.stats, 'pii_detections', '-' .. f[3]) end
  local counts = redis.call('HMGET', k.stats, 'running', 'stopped', 'failed')
  local left = 0
  for i = 1, 3 do left = left + (tonumber(counts[i]) or 0) end
  if left == 0 then
    redis.call('DEL', k.stats)
  else
    add_float(k.stats, 'budget_spent', -tonumber(f[2]))
  end
end

-- An audit stream entry's fields as a table (field name -> value).
local function entry_fields(flat)
  local e = {}
  for i = 1, #flat, 2 do e[flat[i]] = flat[i + 1] end
  return e
end

-- A change made once however often its call is sent: the first run keeps its reply under the
-- call's op key (a random name the client picks per call) for op_ttl milliseconds, and a repeat of
-- the call (the client resends it when a reply was lost) gets that reply back, changing nothing.
-- Every script that changes an agent's counters or holds runs its body through this.
local function once(op, op_ttl, body)
  local first = redis.call('GET', op)
  if first then
    -- A write even on a repeat: a WAIT after this script must still cover the first run's
    -- write, and newer servers count only writes towards a connection's WAIT offset.
    redis.call('PEXPIRE', op, op_ttl)
    return cmsgpack.unpack(first)
  end
  local reply = body()
  redis.call('SET', op, cmsgpack.pack(reply), 'PX', op_ttl)
  return reply
end

-- Queue an audit event in the group's outbox, in the same script as the change it records, so
-- that neither is ever stored without the other. fields are what decode.outbox_event builds the
-- event from (raw values: the JSON is written in Python). Returns the entry's id, its fields and
-- how many entries the outbox holds (more than 1: older ones wait, which the client reads first).
local function queue_event(outbox, fields)
  return redis.call('XADD', outbox, '*', unpack(fields)), fields, redis.call('XLEN', outbox)
end

-- Whether stream entry id a ("<ms>-<n>") comes after b ('' or false: before everything).
local function id_after(a, b)
  if not b or b == '' then return true end
  local am, an = string.match(a, '^(%d+)-(%d+)$')
  local bm, bn = string.match(b, '^(%d+)-(%d+)$')
  am, an, bm, bn = tonumber(am), tonumber(an), tonumber(bm), tonumber(bn)
  return am > bm or (am == bm and an > bn)
end

-- The smallest stream entry id after id ("<ms>-<n>"): XTRIM MINID of it drops id and all before.
local function next_id(id)
  local ms, n = string.match(id, '^(%d+)-(%d+)$')
  return ms .. '-' .. int(tonumber(n) + 1)
end

-- Audit records are indexed by time per block of TIME_BLOCK seqs, so that a query by time skips
-- the seqs where nothing can match (timestamps are the events' own and need not rise with seq).
-- Both sorted sets are keyed by a block's first seq and scored by a timestamp; scores and blocks
-- rise together. highs: for each block where it rises, the highest timestamp of the records up to
-- that block's end (no record before the first block scored >= since has a timestamp >= since).
-- lows: per block, the lowest timestamp of the records from that block on (no record from the
-- first block scored > until on has a timestamp <= until). A pruned or deleted record can only
-- make them looser, never wrong.
local function index_time(highs, lows, seq, timestamp)
  local block = int(math.floor((seq - 1) / TIME_BLOCK) * TIME_BLOCK + 1)
  local ts = int(timestamp)
  local top = redis.call('ZRANGE', highs, -1, -1, 'WITHSCORES')
  if not top[2] or timestamp > tonumber(top[2]) then redis.call('ZADD', highs, ts, block) end
  redis.call('ZREMRANGEBYSCORE', lows, ts, '+inf')
  if redis.call('ZRANGE', lows, -1, -1)[1] ~= block then redis.call('ZADD', lows, ts, block) end
end

-- After a prune up to seq last: drop the time index's blocks before it, but the last of them
-- (its score still bounds the records that follow). At most limit + 1 blocks are looked at.
local function prune_time(highs, lows, last, limit)
  for _, key in ipairs({highs, lows}) do
    local n = 0
    for _, block in ipairs(redis.call('ZRANGE', key, 0, limit)) do
      if tonumber(block) > last then break end
      n = n + 1
    end
    if n > 1 then redis.call('ZREMRANGEBYRANK', key, 0, n - 2) end
  end
end
