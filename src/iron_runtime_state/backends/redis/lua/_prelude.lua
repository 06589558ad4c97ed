-- Helpers shared by the scripts. Redis scripts cannot import one another, so
-- scripts.load_scripts() puts in front of each script the definitions below that it uses
-- (each separated from the next by a blank line, with its comment right above it).
--
-- Numbers cross the wire as text. Money is whole micro-units (integers, see money.py): Lua's
-- numbers are doubles, exact for integers up to 2^53, and every total a script forms stays below
-- 4 * MAX_MICROS (about 2^52), so every comparison and sum of money here is exact. Timestamps are
-- floats written with the shortest digits that read back as the same double (like Python's repr);
-- integers that may pass 2^53 (pii counts) are only ever changed with HINCRBY, exact to 64 bits.

local GENESIS_HASH = '__GENESIS_HASH__' -- iron_runtime_state.audit_chain.GENESIS_HASH

local LANDED_KEEP = __LANDED_KEEP__ -- iron_runtime_state.backends.redis.scripts.LANDED_KEEP

local TIME_BLOCK = __TIME_BLOCK__ -- iron_runtime_state.backends.redis.scripts.TIME_BLOCK

local MAX_MICROS = __MAX_MICROS__ -- iron_runtime_state.money.MAX_MICROS

-- The thresholds of a budget stored without any (thresholds.DEFAULT_THRESHOLDS), as text.
local DEFAULT_THRESHOLDS = __DEFAULT_THRESHOLDS__

-- What a client sends for an optional field that takes its default (absent from the hash), where
-- '' is a value of its own (thresholds: '' is none, absent the default).
local ABSENT = '\0'

-- Reply codes a client acts on and runs the script again (see spend.py): ROLL, periods ended and
-- the client computes the new ones (Lua knows no time zones); RESOLVE, on a cluster, holds whose
-- other half lives in another slot expired and the client settles them first.
local ROLL = -10

local RESOLVE = -11

-- Reply codes of refusals that change nothing: a scope the agent lists does not exist; a total
-- past MAX_MICROS; an agent still stored as 0.4/0.5 wrote it (floats: run migrate); on a cluster,
-- a step that came after its pending hold expired.
local NO_SCOPE = -6

local TOO_BIG = -8

local LEGACY = -9

local LATE = -7

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

-- The server's clock in seconds. Reservations expire by this one clock, so clients on hosts
-- whose clocks disagree still agree on which holds are open.
local function server_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- The fields of an agent's hash that scripts read, in this order (scripts.AGENT_FIELDS): its state
-- (status to thresholds, as replies carry it), where its period ends and the highest threshold
-- alerted in it. An agent 0.4/0.5 stored lacks spent_micros until migrated.
local AGENT_FIELDS = __AGENT_FIELDS__

-- The amount of a hold, in micro-units: holds are members "<id>:<micro-units>[:...]".
local function hold_amount(member)
  return tonumber(string.match(member, '^[^:]*:(%d+)'))
end

-- Drop the expired holds (scored by expiry, the server's clock: now, or read here when nil and
-- there are holds) of a scope's holds set; the sum of the open ones. (An agent's expired holds
-- are dropped by expire_holds, with their events.)
local function open_holds(holds, now)
  if redis.call('EXISTS', holds) == 0 then return 0 end
  redis.call('ZREMRANGEBYSCORE', holds, '-inf', num(now or server_now()))
  local total = 0
  for _, m in ipairs(redis.call('ZRANGE', holds, 0, -1)) do total = total + hold_amount(m) end
  return total
end

-- The holds of an agent's holds set that lapsed unsettled by t (the server's clock), as
-- {member, expiry, ...}, left in place: only a write drops them (expire_holds), each with its
-- hold_expired event, so a read never writes one and each lapse is written once.
local function lapsed(holds, t)
  return redis.call('ZRANGEBYSCORE', holds, '-inf', num(t), 'WITHSCORES')
end

-- Drop an agent's lapsed holds (h.late, see lapsed, from its holds set h.holds) and, on a
-- standalone server (h.prefix: the budgets prefix), their copies on the scopes they touched;
-- a hold_expired event each is appended to events (at: the caller's clock, which dates events).
-- On a cluster (prefix '') a scope's copy is settled in the budgets slot once it expires there
-- too (see spend.py), and writes no event: the agent's hold is the one that counts.
local function expire_holds(h, agent_id, at, events)
  local late = h.late
  for i = 1, #late, 2 do
    local rid, amount, scopes = string.match(late[i], '^([^:]*):(%d+):?(.*)$')
    redis.call('ZREM', h.holds, late[i])
    if h.prefix ~= '' and scopes ~= '' then
      local copy = rid .. ':' .. amount .. ':' .. agent_id .. ':' .. scopes
      for name in string.gmatch(scopes, '[^,]+') do
        redis.call('ZREM', h.prefix .. 'holds:' .. name, copy)
      end
    end
    events[#events + 1] = {'kind', 'expired', 'agent', agent_id, 'at', at, 'reservation', rid,
      'amount', amount, 'expires', late[i + 1], 'scopes', scopes}
  end
end

-- The sum of every hold of a holds set, expired ones included, and the members expired by now
-- (on a cluster these are settled with the other slot before they are dropped; see spend.py).
local function all_holds(holds, now)
  local total, expired = 0, {}
  local members = redis.call('ZRANGE', holds, 0, -1, 'WITHSCORES')
  for i = 1, #members, 2 do
    total = total + hold_amount(members[i])
    if tonumber(members[i + 1]) <= now then expired[#expired + 1] = members[i] end
  end
  return total, expired
end

-- The sum of the holds of a holds set still open at now, without changing it (for reads).
local function held_at(holds, now)
  local total = 0
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', holds, '(' .. num(now), '+inf')) do
    total = total + hold_amount(m)
  end
  return total
end

-- Let a scope's holds set expire a second after its last hold (by the server's clock), so that
-- the holds of a process that died leave nothing behind. (An agent's holds set has no expiry:
-- its lapsed holds wait there for the next write on the agent, which reports them.)
local function keep_until_last(holds)
  local last = redis.call('ZRANGE', holds, -1, -1, 'WITHSCORES')[2]
  if last then redis.call('PEXPIREAT', holds, math.ceil(tonumber(last) * 1000) + 1000) end
end

-- Remove one hold if it is open (not expired by the server's clock); whether it was. An expired
-- hold stays for the next write on the agent to drop with its hold_expired event.
local function take_hold(holds, hold)
  local expires_at = redis.call('ZSCORE', holds, hold)
  if not expires_at or tonumber(expires_at) <= server_now() then return false end
  redis.call('ZREM', holds, hold)
  return true
end

-- Add delta to a float field (0.4/0.5's statistics; see migrate.lua).
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

-- Each group keeps its agents' ids per label too (a sorted set per key=value, score 0, under the
-- group's label prefix, in the group's slot), so that iter_agent_states(labels=...) walks only
-- the matches. old and new are the labels as stored (JSON objects; false or '': none).
local function index_labels(prefix, agent_id, old, new)
  if (old or '') == (new or '') then return end
  local before = (old and old ~= '') and cjson.decode(old) or {}
  local after = (new and new ~= '') and cjson.decode(new) or {}
  for k, v in pairs(before) do
    if after[k] ~= v then redis.call('ZREM', prefix .. k .. '=' .. v, agent_id) end
  end
  for k, v in pairs(after) do
    if before[k] ~= v then redis.call('ZADD', prefix .. k .. '=' .. v, 0, agent_id) end
  end
end

-- An agent's state as replies carry it, after a code: the first ten AGENT_FIELDS (false: none).
local function state_reply(code, f)
  return {code, f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8], f[9], f[10]}
end

-- Drop the holds an agent's holds set has on scopes: on a standalone server (prefix: the budgets
-- prefix) here; on a cluster (prefix '') each scope hold's member is appended to dropped, for the
-- client to drop in the budgets slot (see spend.py).
local function drop_scope_holds(holds, agent_id, prefix, dropped)
  for _, m in ipairs(redis.call('ZRANGE', holds, 0, -1)) do
    local rid, amount, scopes = string.match(m, '^([^:]*):(%d+):(.+)$')
    if scopes then
      local member = rid .. ':' .. amount .. ':' .. agent_id .. ':' .. scopes
      if prefix ~= '' then
        for name in string.gmatch(scopes, '[^,]+') do
          redis.call('ZREM', prefix .. 'holds:' .. name, member)
        end
      else
        dropped[#dropped + 1] = member
      end
    end
  end
end

-- Remove an agent whose stored {status, spent_micros, pii_detections, labels} are f, with its
-- holds, on scopes too (k: its keys, k.status its group's status sets, k.labels its label
-- prefix, k.prefix and k.dropped as drop_scope_holds takes them).
-- A group left empty drops its statistics hash.
local function drop_agent(k, agent_id, f)
  drop_scope_holds(k.holds, agent_id, k.prefix, k.dropped)
  redis.call('DEL', k.agent, k.holds, k.pending)
  redis.call('ZREM', k.ids, agent_id)
  redis.call('ZREM', k.finished, agent_id)
  index_status(k.status, agent_id, f[1], nil)
  index_labels(k.labels, agent_id, f[4], nil)
  redis.call('HINCRBY', k.stats, f[1], -1)
  if f[3] ~= '0' then redis.call('HINCRBY', k.stats, 'pii_detections', '-' .. f[3]) end
  local counts = redis.call('HMGET', k.stats, 'running', 'stopped', 'failed')
  local left = 0
  for i = 1, 3 do left = left + (tonumber(counts[i]) or 0) end
  if left == 0 then
    redis.call('DEL', k.stats)
  elseif f[2] and f[2] ~= '0' then
    redis.call('HINCRBY', k.stats, 'spent_micros', '-' .. f[2])
  end
end

-- A budget as the scripts handle it, an agent's own or a scope's: its hash key, its name ('' for
-- an agent's own), its limit (nil: none) and spend in micro-units, its period (nil: none), time
-- zone, the start of the period its spend belongs to (text as stored, '' for none) and where that
-- period ends, its thresholds (text as stored; false: the default) and the highest of them alerted
-- in the period (0: none). f holds limit_micros, spent_micros, period, tz, period_start,
-- period_end, thresholds and alerted as stored.
local function budget(key, name, f)
  return {key = key, name = name, limit = tonumber(f[1]), spent = tonumber(f[2]) or 0,
    period = f[3] or nil, tz = f[4] or 'UTC', start = f[5] or '', stop = tonumber(f[6]), held = 0,
    thresholds = f[7] or false, alerted = tonumber(f[8]) or 0}
end

-- An agent's own budget, from its AGENT_FIELDS f.
local function agent_budget(agent, f)
  return budget(agent, '', {f[4], f[2], f[7], f[8], f[9], f[11], f[10], f[12]})
end

-- The scope name under the budgets keys' prefix, or nil when it does not exist.
local function scope_budget(prefix, name)
  local key = prefix .. 'scope:' .. name
  local f = redis.call('HMGET', key, 'limit_micros', 'spent_micros', 'period', 'tz',
    'period_start', 'period_end', 'thresholds', 'alerted')
  if not f[2] then return nil end
  local b = budget(key, name, f)
  b.holds = prefix .. 'holds:' .. name
  return b
end

-- The scopes named in text (comma-separated, as an agent stores them) appended to budgets, in
-- order; on a name that does not exist, nil and that name.
local function add_scopes(budgets, prefix, text)
  for name in string.gmatch(text or '', '[^,]+') do
    local b = scope_budget(prefix, name)
    if not b then return nil, name end
    budgets[#budgets + 1] = b
  end
  return budgets
end

-- The periods the client computed, from ARGV[at] to the last ARGV but one, four values each: the
-- budget's name ('' for the agent's own), the period_start it found, the new period's start and end.
local function given_rolls(at)
  local rolls = {}
  -- The last ARGV is not a roll: it is the outbox's landed entry (see trim_landed).
  for i = at, #ARGV - 4, 4 do rolls[ARGV[i]] = {ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]} end
  return rolls
end

-- Each budget whose period ended by now (the caller's clock) takes the new period the client
-- computed for it: its spend reads 0 from here on, b.closed keeps the closed period's. Returns
-- nil, or, when the client computed none for some (or for a period_start another caller has
-- moved since), the ROLL reply asking for them: name, period, time zone and period_start of
-- each. Nothing is written: a caller writes the rolls (write_rolls) once it knows it goes on.
local function plan_rolls(budgets, now, rolls)
  local need
  for _, b in ipairs(budgets) do
    if b.period and not (b.stop and now < b.stop) then
      local r = rolls[b.name]
      if r and r[1] == b.start then
        b.roll, b.closed, b.spent = r, b.spent, 0
      else
        need = need or {ROLL}
        need[#need + 1] = b.name
        need[#need + 1] = b.period
        need[#need + 1] = b.tz
        need[#need + 1] = b.start
      end
    end
  end
  return need
end

-- plan_rolls for the budgets when one of them has a period (the rolls given from ARGV[at] on).
local function rolls_needed(budgets, now, at)
  for _, b in ipairs(budgets) do
    if b.period then return plan_rolls(budgets, now, given_rolls(at)) end
  end
  return nil
end

-- Store the new periods plan_rolls gave: each closed period gets its budget_reset event (fields
-- appended to events; agent_id is '' for a scope's), open holds carry over and nothing is alerted
-- in the new period yet. An agent's closed spend leaves its group's statistics (stats: that hash,
-- or nil for scopes).
local function write_rolls(budgets, agent_id, at, events, stats)
  for _, b in ipairs(budgets) do
    local r = b.roll
    if r then
      if b.start ~= '' then
        events[#events + 1] = {'kind', 'reset', 'agent', b.name == '' and agent_id or '',
          'scope', b.name, 'period', b.period, 'tz', b.tz, 'start', b.start, 'spent', int(b.closed),
          'at', at}
      end
      redis.call('HSET', b.key, 'spent_micros', int(b.spent), 'period_start', r[2], 'period_end', r[3])
      if b.alerted ~= 0 then
        redis.call('HDEL', b.key, 'alerted')
        b.alerted = 0
      end
      if stats and b.name == '' and b.closed ~= 0 then
        redis.call('HINCRBY', stats, 'spent_micros', -b.closed)
      end
      b.start, b.stop, b.roll = r[2], tonumber(r[3]), nil
    end
  end
end

-- The first budget, in order, that amount more would take past its limit (spent + held +
-- amount > limit), or nil.
local function refusing(budgets, amount)
  for _, b in ipairs(budgets) do
    if b.limit and b.spent + b.held + amount > b.limit then return b end
  end
  return nil
end

-- The first budget whose total (spent, with its holds when held is true, + amount) would pass
-- MAX_MICROS, and that total; or nil.
local function too_big(budgets, amount, held)
  for _, b in ipairs(budgets) do
    local total = b.spent + amount + (held and b.held or 0)
    if total > MAX_MICROS then return b, total end
  end
  return nil
end

-- The budget_exceeded event of a refused spend or hold (action 'spend' or 'reserve') by budget b.
local function refusal(action, agent_id, at, b, amount)
  return {'kind', action, 'agent', agent_id, 'at', at, 'scope', b.name, 'limit', int(b.limit),
    'spent', int(b.spent), 'reserved', int(b.held), 'amount', int(amount)}
end

-- The budget_exceeded event of a commit that took budget b past its limit (spent: the new total).
local function overspent(agent_id, at, b, actual, held, rid)
  return {'kind', 'commit', 'agent', agent_id, 'at', at, 'scope', b.name, 'limit', int(b.limit),
    'spent', int(b.spent), 'actual', int(actual), 'held', int(held), 'reservation', rid}
end

-- A budget scope as replies carry it: name, limit, period, time zone, period_start, spent, held,
-- thresholds (false: the default).
local function budget_row(b)
  return {b.name, b.limit and int(b.limit) or false, b.period or false, b.tz, b.start,
    int(b.spent), int(b.held), b.thresholds}
end

-- The ledger's spend record of a charge (events.spend builds it in Python): amount micro-units
-- charged to the agent and to scopes (their names comma-separated, '' for none), with the agent's
-- labels as stored (JSON; false: none), the reservation settled ('' for record_spend) and the
-- caller's note (JSON of SpendNote.fields(), '' for none).
local function spend_record(agent_id, at, amount, scopes, labels, rid, note)
  return {'kind', 'charge', 'agent', agent_id, 'at', at, 'amount', int(amount), 'scopes', scopes,
    'labels', labels or '', 'reservation', rid, 'note', note}
end

-- The budget_threshold events of a charge by agent_id that left budget b at b.spent, appended to
-- events: thresholds.crossed, the same comparison as in Python (t > alerted and spent >= t * limit,
-- as doubles), so every store alerts at the same spend; nothing without a limit (or with 0). b's
-- alerted level rises to the last one, in the same script: each threshold fires once a period.
local function alert(b, agent_id, at, events)
  if not b.limit or b.limit == 0 then return end
  local list = DEFAULT_THRESHOLDS
  if b.thresholds then
    list = {}
    for s in string.gmatch(b.thresholds, '[^,]+') do list[#list + 1] = s end
  end
  local top
  for _, s in ipairs(list) do
    local t = tonumber(s)
    if t > b.alerted and b.spent >= t * b.limit then
      events[#events + 1] = {'kind', 'threshold', 'agent', agent_id, 'at', at, 'threshold', s,
        'limit', int(b.limit), 'spent', int(b.spent), 'start', b.start, 'scope', b.name}
      top = s
    end
  end
  if top then
    b.alerted = tonumber(top)
    redis.call('HSET', b.key, 'alerted', top)
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
-- Every script that changes an agent's counters or holds runs its body through this. A reply
-- that asks the client for something first (ROLL, RESOLVE) changed nothing and is not kept: the
-- client runs the same call again with what was asked.
local function once(op, op_ttl, body)
  local first = redis.call('GET', op)
  if first then
    -- A write even on a repeat: a WAIT after this script must still cover the first run's
    -- write, and newer servers count only writes towards a connection's WAIT offset.
    redis.call('PEXPIRE', op, op_ttl)
    return cmsgpack.unpack(first)
  end
  local reply = body()
  if type(reply) == 'table' and (reply[1] == ROLL or reply[1] == RESOLVE) then return reply end
  redis.call('SET', op, cmsgpack.pack(reply), 'PX', op_ttl)
  return reply
end

-- Queue a change's audit events in an outbox, in the same script as the change, so that neither
-- is ever stored without the other (raw values: decode.outbox_event builds each event in Python).
-- Appends to reply how many entries the outbox then holds (more than the change's own: older
-- ones wait, which the client appends first), then each entry's id and fields.
local function queue_events(outbox, events, reply)
  if #events == 0 then return reply end
  local tail = {}
  for _, fields in ipairs(events) do
    tail[#tail + 1] = redis.call('XADD', outbox, '*', unpack(fields))
    tail[#tail + 1] = fields
  end
  reply[#reply + 1] = redis.call('XLEN', outbox)
  for _, value in ipairs(tail) do reply[#reply + 1] = value end
  return reply
end

-- The start of a spend or a hold (record_spend.lua, reserve.lua): the agent's AGENT_FIELDS f, its
-- own budget me, the budgets to check (the agent's, then on a standalone server its scopes, from
-- the budgets prefix; prefix '' on a cluster), each with its open holds (a scope's expired ones
-- dropped), pending spends counting on the agent, and the agent's lapsed holds in me.lapsed (for
-- expire_holds, once the call goes on to change something); or, first, the reply that ends the call (no such agent,
-- not running, a missing scope, 0.4/0.5's floats, expired pending holds on a cluster, periods to
-- roll: the rolls given from ARGV[at] on).
local function spender(agent, holds, pending, prefix, now, at)
  local f = redis.call('HMGET', agent, unpack(AGENT_FIELDS))
  if not f[1] then return {-1} end
  if not f[2] then return {LEGACY} end
  if f[1] ~= 'running' then return {-2, f[1]} end
  local me = agent_budget(agent, f)
  local budgets, waiting = {me}, 0
  if prefix == '' then
    local expired
    waiting, expired = all_holds(pending, server_now())
    if #expired > 0 then return {RESOLVE, unpack(expired)} end
  else
    local found, missing = add_scopes(budgets, prefix, f[6])
    if not found then return {NO_SCOPE, missing} end
  end
  local need = rolls_needed(budgets, now, at)
  if need then return need end
  local t = server_now()
  me.held = held_at(holds, t) + waiting
  me.lapsed = {holds = holds, late = lapsed(holds, t), prefix = prefix}
  for i = 2, #budgets do budgets[i].held = open_holds(budgets[i].holds, t) end
  return nil, f, me, budgets
end

-- A spend or a hold (action 'spend' or 'reserve') that budget refused: the agent's lapsed holds
-- go (see expire_holds), the periods that ended roll (see write_rolls) and its budget_exceeded
-- event is queued after their events. The reply
-- {0, the agent's state (see state_reply), its holds, the scope that refused (budget_row) or
-- false for the agent's own limit}, then the events queued.
local function refuse(action, refused, f, me, budgets, amount, agent_id, at, stats, outbox)
  local events = {}
  expire_holds(me.lapsed, agent_id, at, events)
  write_rolls(budgets, agent_id, at, events, stats)
  f[9] = me.start ~= '' and me.start
  events[#events + 1] = refusal(action, agent_id, at, refused, amount)
  f[2] = int(me.spent)
  local reply = state_reply(0, f)
  reply[12] = int(me.held)
  reply[13] = refused ~= me and budget_row(refused)
  return queue_events(outbox, events, reply)
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

-- Drop from an outbox the entries the trail holds already. On a Redis Cluster the client cannot
-- trim an outbox in the script that appends its entries to the trail (another slot), so it
-- passes the id of the group's last entry it knows appended (the group's mark, or one it
-- saw) as the last ARGV of the group's next change ('' for none; always '' on a standalone
-- server, where the append trims), and that change trims up to it before queueing anything.
-- Safe however stale the id: entries are appended in id order, so every entry up to a mark the
-- trail ever held is in the trail (a resend after a lost reply trims no more).
local function trim_landed(outbox)
  local landed = ARGV[#ARGV]
  if landed ~= '' then redis.call('XTRIM', outbox, 'MINID', next_id(landed)) end
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
