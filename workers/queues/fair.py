"""The fetch scripts: how a worker takes messages from the queues into its in-flight hash
(workers/queues/inbox.py says why it is one script), and how it shares each queue between its tenants.

The fair fetch is start-time fair queueing between tenants (bertq/tenants.py), by items: each queue keeps a
virtual time per tenant, a message taken adds its items over its tenant's weight (BERTQ_TENANT_WEIGHTS) to
its tenant's, and the next message comes from the tenant with work and the lowest virtual time. The engine's
pool shares the device the same way between what a worker holds (workers/engine/pool.py), so the fetch's
turns are not undone by the rows already held.
"""

from __future__ import annotations

from bertq.tenants import COUNT_QUEUED, INDEX_PREFIX, VIRTUAL_TIMES_PREFIX

# Lua: ``take`` moves one message from ``list`` into the in-flight hash (as from ``source``), within a
# fetch's most messages and bytes, and takes its items off its tenant's queued count. ARGV[1], ARGV[2]: the
# most messages and bytes; ARGV[4]: the consumer, listed in the registry before it holds anything.
TAKE = (
    COUNT_QUEUED
    + """
local inflight, sequence = KEYS[1], KEYS[2]
local most, budget = tonumber(ARGV[1]), tonumber(ARGV[2])
local out, count, bytes = {}, 0, 0
-- the clock makes tags unique even if a failover loses writes and the sequence goes back
local now = redis.call('TIME')
local stamp = now[1] .. string.format('%06d', tonumber(now[2]))
-- listed where the reaper looks before it holds anything; when Redis is full this write is refused
-- first, so a worker never holds what no reaper can see
redis.call('ZADD', KEYS[3], 'NX', tonumber(now[1]) + tonumber(now[2]) / 1e6, ARGV[4])
local function take(list, source)
  if count >= most or (count > 0 and bytes >= budget) then return nil end
  local raw = redis.call('RPOP', list)
  if not raw then return nil end
  local tag = redis.call('INCR', sequence) .. '-' .. stamp
  redis.call('HSET', inflight, tag, source .. '\\n' .. raw)
  out[#out + 1] = tag
  out[#out + 1] = source
  out[#out + 1] = raw
  count = count + 1
  bytes = bytes + string.len(raw)
  count_queued(source, raw, -1)
  return raw
end
"""
)

# The lists in order. KEYS: in-flight hash, sequence, consumers zset, then the lists. ARGV: most messages,
# most bytes, (unused), consumer.
TAKE_IN_ORDER = (
    TAKE
    + """
for i = 4, #KEYS do
  while take(KEYS[i], KEYS[i]) do end
end
return out
"""
)

# The fair fetch: start-time fair queueing between each queue's tenants. Every queue keeps a virtual time
# per tenant (``bertq:tenants:vtime:<queue>``; its field '' is the queue's clock): each message taken adds
# its items (its ``bertq_items`` header; without one, 1 per started KiB) over the tenant's weight, and the
# next message comes from the tenant with work and the lowest virtual time, its best priority step first
# (priorities order work within a tenant). A tenant that had no work starts at the clock, the virtual time
# of the last message taken, so idle time banks no credit. Between queues, the chosen tenants' best priority
# steps decide, then the queues' order, as before tenants. First, whatever ``wait`` landed (the default
# tenant's). It stops at the most items too (past the first message): a worker that held thousands of one
# tenant's items beyond its cap would fetch again only once they were done, and another tenant's job would
# wait for that. KEYS: in-flight hash, sequence, consumers zset, then a landing list per queue. ARGV: most
# messages, most bytes, the number of queues n, consumer, the n queues, the weights (a JSON object), the
# configured tenants (a JSON list), the most items.
FAIR_FETCH = (
    TAKE
    + """
local n = tonumber(ARGV[3])
local weights = cjson.decode(ARGV[5 + n])
local configured = cjson.decode(ARGV[6 + n])
local item_budget, items = tonumber(ARGV[7 + n]), 0
local function full()
  return count >= most or (count > 0 and (bytes >= budget or items >= item_budget))
end
local function first_step(lists, from)
  for step = from, #lists do
    if redis.call('LLEN', lists[step]) > 0 then return step end
  end
  return nil
end
local function cost(raw)
  local items = message_items(raw)
  if items > 0 then return items end
  return math.floor(string.len(raw) / 1024) + 1
end
local queues = {}
local function flow_of(q, tenant)
  for _, flow in ipairs(q.flows) do
    if flow.tenant == tenant then return flow end
  end
  local base = tenant == 'default' and q.queue or (q.queue .. '@' .. tenant)
  local lists = {base}
  for _, step in ipairs({'3', '6', '9'}) do lists[#lists + 1] = base .. '$SEP' .. step end
  local stored = tonumber(redis.call('HGET', q.vtimes, tenant) or '0')
  local flow = {tenant = tenant, lists = lists, vt = math.max(stored, q.clock),
    weight = tonumber(weights[tenant]) or 1, taken = false}
  q.flows[#q.flows + 1] = flow
  return flow
end
local function charge(q, flow, raw)
  local spent = cost(raw)
  q.clock = math.max(q.clock, flow.vt)
  flow.vt = flow.vt + spent / flow.weight
  flow.taken = true
  items = items + spent
end
for i = 1, n do
  local queue = ARGV[4 + i]
  local index = '$INDEX' .. queue
  if #configured > 0 then redis.call('SADD', index, unpack(configured)) end
  local q = {queue = queue, vtimes = '$VTIMES' .. queue, flows = {}}
  q.clock = tonumber(redis.call('HGET', q.vtimes, '') or '0')
  queues[i] = q
  while not full() do
    local raw = take(KEYS[3 + i], queue)
    if not raw then break end
    charge(q, flow_of(q, 'default'), raw)
  end
  local tenants = redis.call('SMEMBERS', index)
  table.sort(tenants)
  table.insert(tenants, 1, 'default')
  for _, tenant in ipairs(tenants) do
    local flow = flow_of(q, tenant)
    flow.step = first_step(flow.lists, 1)
  end
end
while not full() do
  local chosen, chosen_q
  for _, q in ipairs(queues) do
    local best
    for _, flow in ipairs(q.flows) do
      if flow.step and (not best or flow.vt < best.vt) then best = flow end
    end
    if best and (not chosen or best.step < chosen.step) then chosen, chosen_q = best, q end
  end
  if not chosen then break end
  local list = chosen.lists[chosen.step]
  local raw = take(list, list)
  if raw then charge(chosen_q, chosen, raw) end
  chosen.step = first_step(chosen.lists, chosen.step)
end
for _, q in ipairs(queues) do
  local written = false
  for _, flow in ipairs(q.flows) do
    if flow.taken then
      redis.call('HSET', q.vtimes, flow.tenant, tostring(flow.vt))
      written = true
    end
  end
  if written then redis.call('HSET', q.vtimes, '', tostring(q.clock)) end
end
return out
""".replace("$SEP", "\\6\\22")
    .replace("$INDEX", INDEX_PREFIX)
    .replace("$VTIMES", VIRTUAL_TIMES_PREFIX)
)
