-- budgets_read: budget scopes as stored, with the sum of their holds still open (expired ones are
-- left for the next change to settle), in one read.
-- KEYS: the names of every scope
-- ARGV: budgets prefix, then the names to read (none: every scope, by name)
-- Returns each scope that exists as a budget_row.
local prefix = ARGV[1]
local names = {unpack(ARGV, 2)}
if #names == 0 then names = redis.call('ZRANGE', KEYS[1], 0, -1) end
local now = server_now()
local rows = {}
for _, name in ipairs(names) do
  local b = scope_budget(prefix, name)
  if b then
    b.held = held_at(b.holds, now)
    rows[#rows + 1] = budget_row(b)
  end
end
return rows
