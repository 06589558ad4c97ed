-- meta: mark a namespace with the layout version and slot-group count this library writes, and
-- read back what the namespace already holds (a namespace written by another version shows it).
-- A new namespace is marked as keeping its groups' status sets from the start; one written
-- before them lacks the mark until the client has built them (see index_status.lua).
-- KEYS: meta
-- ARGV: layout, groups
-- Returns {layout, groups, status sets mark} as stored.
if redis.call('HSETNX', KEYS[1], 'layout', ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], 'status_sets', '1')
end
redis.call('HSETNX', KEYS[1], 'groups', ARGV[2])
return redis.call('HMGET', KEYS[1], 'layout', 'groups', 'status_sets')
