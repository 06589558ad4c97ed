-- meta: mark a namespace with the layout version and slot-group count this library writes, and
-- read back what the namespace already holds (a namespace written by another version shows it).
-- KEYS: meta
-- ARGV: layout, groups
-- Returns {layout, groups} as stored.
redis.call('HSETNX', KEYS[1], 'layout', ARGV[1])
redis.call('HSETNX', KEYS[1], 'groups', ARGV[2])
return redis.call('HMGET', KEYS[1], 'layout', 'groups')
