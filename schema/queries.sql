-- Every runtime query, one named block each ("-- name: <name>"), loaded once by
-- daemons.store. Queries name their columns, so a column added or dropped by a live
-- migration (0003: comment) never breaks a running daemon. Every state transition is
-- conditional on the expected state, and a move out of `processing` on the attempt its
-- writer holds (0004): a late, duplicate or stale delivery changes nothing.
--
-- Stamps of unfinished tasks (leases, staleness) are the database's clock, like done
-- times: no host's clock is ever compared with another's.

-- name: insert_batch
-- One statement per batch; RETURNING gives each row back with its id (no reliance on
-- the order of RETURNING). Inserted `processing` (a client's task) is a first claim.
INSERT INTO tasks (type, value, state, creation_time, last_update_time, attempt)
SELECT u.type, u.value, %(state)s::task_state, u.creation_time, extract(epoch FROM statement_timestamp()),
       (%(state)s::task_state = 'processing')::int
FROM unnest(%(types)s::smallint[], %(values)s::smallint[], %(creation_times)s::float8[])
     AS u(type, value, creation_time)
RETURNING id, type, value, creation_time, attempt

-- name: register_keyed
-- Client tasks with idempotency keys, registered `processing` (a first claim) in one
-- statement: a key seen before gives back its task's id with attempt 0 ("claimed
-- nothing now"); a new key takes an id and makes the task. `n` maps each row back to
-- its request; a key twice in one batch is registered for its first request only. A key
-- that a concurrent statement is registering gives no row at all (its
-- insert waits, then skips; this snapshot cannot see it yet): the caller answers "try
-- again", and the retry finds it.
WITH u AS (
    SELECT * FROM unnest(%(keys)s::text[], %(types)s::smallint[], %(values)s::smallint[],
                         %(creation_times)s::float8[])
             WITH ORDINALITY AS u(key, type, value, creation_time, n)
), first AS (
    SELECT DISTINCT ON (key) key, type, value, creation_time, n FROM u ORDER BY key, n
), claimed AS (
    INSERT INTO task_keys (key, id)
    SELECT key, nextval('task_ids') FROM first
    ON CONFLICT (key) DO NOTHING
    RETURNING key, id
), made AS (
    INSERT INTO tasks (id, type, value, state, creation_time, last_update_time, attempt)
    SELECT c.id, f.type, f.value, 'processing', f.creation_time,
           extract(epoch FROM statement_timestamp()), 1
    FROM claimed AS c JOIN first AS f ON f.key = c.key
    RETURNING id, type, value, creation_time, attempt
)
SELECT f.n, m.id, m.type, m.value, m.creation_time, m.attempt
FROM made AS m JOIN claimed AS c ON c.id = m.id JOIN first AS f ON f.key = c.key
UNION ALL
SELECT u.n, k.id, u.type, u.value, u.creation_time, 0
FROM task_keys AS k JOIN u ON u.key = k.key

-- name: reserve_ids
-- The producer takes its batch's ids before it inserts, so an insert retried after a
-- lost reply names the same rows and cannot make a second copy of them.
SELECT nextval('task_ids') FROM generate_series(1, %(n)s)

-- name: insert_reserved
INSERT INTO tasks (id, type, value, state, creation_time, last_update_time)
SELECT u.id, u.type, u.value, %(state)s::task_state, u.creation_time, extract(epoch FROM statement_timestamp())
FROM unnest(%(ids)s::bigint[], %(types)s::smallint[], %(values)s::smallint[],
            %(creation_times)s::float8[]) AS u(id, type, value, creation_time)
RETURNING id

-- name: insert_reserved_retry
-- The retry of an insert whose outcome is unknown: nothing if any of its ids is stored
-- (the first attempt committed; its reserved ids are nobody else's). Only retries pay
-- for the lookups: one index probe per id and done partition.
INSERT INTO tasks (id, type, value, state, creation_time, last_update_time)
SELECT u.id, u.type, u.value, %(state)s::task_state, u.creation_time, extract(epoch FROM statement_timestamp())
FROM unnest(%(ids)s::bigint[], %(types)s::smallint[], %(values)s::smallint[],
            %(creation_times)s::float8[]) AS u(id, type, value, creation_time)
WHERE NOT EXISTS (SELECT 1 FROM tasks WHERE id = ANY(%(ids)s::bigint[]))
RETURNING id

-- name: mark_processing
-- One scan, never a join: primary-key lookups for the batch, or one pass over the hot
-- partition against the (hashed) id list, whichever the planner prices lower; each
-- costs about the batch or the partition. A join against unnest(...) could be planned
-- as a loop over the batch for every received row once autoanalyze had sampled the
-- partition at an instant with no `received` row (statistics: 1 expected; found: the
-- backlog), batch x backlog rows per claim (tests/integration/test_store.py). A claim:
-- the attempt goes up (no index holds it, so the update stays HOT), its lease starts now.
UPDATE tasks AS t SET state = 'processing', last_update_time = extract(epoch FROM statement_timestamp()),
                      attempt = t.attempt + 1
WHERE t.id = ANY(%(ids)s::bigint[]) AND t.state = 'received'
RETURNING t.id, t.type, t.value, t.creation_time, t.attempt

-- name: mark_done
-- Moves each row into the done partition of its done time: the database's clock, so a
-- host with a wrong clock cannot put rows where retention would miss them.
-- Only the current attempt's owner wins; a stale owner (lease taken back) changes nothing.
UPDATE tasks AS t SET state = 'done', last_update_time = extract(epoch FROM statement_timestamp())
FROM unnest(%(ids)s::bigint[], %(attempts)s::int[]) AS u(id, attempt)
WHERE t.id = u.id AND t.state = 'processing' AND t.attempt = u.attempt
RETURNING t.id

-- name: mark_done_retry
-- The retry of a done write whose outcome is unknown (its reply may have been lost after
-- the commit): what it moves now, and what is already done under the writer's own
-- attempt, which can only be that earlier write. The SELECT sees the rows as they were
-- before this statement, so nothing is returned twice. Only retries pay for the lookups.
WITH u AS (
    SELECT * FROM unnest(%(ids)s::bigint[], %(attempts)s::int[]) AS u(id, attempt)
), moved AS (
    UPDATE tasks AS t SET state = 'done', last_update_time = extract(epoch FROM statement_timestamp())
    FROM u
    WHERE t.id = u.id AND t.state = 'processing' AND t.attempt = u.attempt
    RETURNING t.id
)
SELECT id FROM moved
UNION ALL
SELECT t.id FROM tasks AS t JOIN u ON t.id = u.id
WHERE t.state = 'done' AND t.attempt = u.attempt

-- name: release_processing
-- Work a draining consumer could not finish goes back to `received`, stamped 0 so the
-- next redelivery sweep picks it up at once (its creation time, a client's word, may
-- lie in the future). Only the current owner's release counts, and it ends the attempt.
UPDATE tasks AS t SET state = 'received', last_update_time = 0, attempt = t.attempt + 1
FROM unnest(%(ids)s::bigint[], %(attempts)s::int[]) AS u(id, attempt)
WHERE t.id = u.id AND t.state = 'processing' AND t.attempt = u.attempt
RETURNING t.id

-- name: ping
SELECT 1

-- name: existing_ids
SELECT id FROM tasks WHERE id = ANY(%(ids)s::bigint[])

-- name: count_unfinished
-- task_counts is kept exact by triggers (migration 0001), in shards (0005) summed here:
-- 16 rows at any table size (one before 0005: the sums work on both).
SELECT sum(received + processing)::bigint FROM task_counts

-- name: count_by_state
SELECT sum(received)::bigint, sum(processing)::bigint, sum(done)::bigint FROM task_counts

-- name: done_totals_by_type
-- Lifetime totals (migration 0002), in shards (0005): 160 rows, whatever the history or
-- the retention.
SELECT type, sum(done)::bigint, sum(value_sum)::bigint FROM task_totals GROUP BY type ORDER BY type

-- name: take_off_done
-- Done rows removed by retention leave the stored-done count, in a shard nobody holds
-- (shard 1 if every one is held, or before 0005).
UPDATE task_counts SET done = done - %(n)s
WHERE id = coalesce((SELECT c.id FROM task_counts AS c
                     ORDER BY (c.id + pg_backend_pid()) %% 16 LIMIT 1 FOR UPDATE SKIP LOCKED), 1)

-- name: reclaim_expired
-- Leases: a `processing` task not finished by its deadline belonged to a consumer that
-- died mid-work, judged by the database's clock alone. SKIP LOCKED lets several daemons
-- sweep without resending the same task. The reclaim ends the attempt: its old owner, if
-- alive after all, can no longer complete or release it.
WITH expired AS (
    SELECT id FROM tasks
    WHERE state = 'processing' AND last_update_time < extract(epoch FROM statement_timestamp()) - %(lease_s)s
    ORDER BY last_update_time
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE tasks AS t SET state = 'received', last_update_time = extract(epoch FROM statement_timestamp()), attempt = t.attempt + 1
FROM expired WHERE t.id = expired.id
RETURNING t.id, t.type, t.value, t.creation_time, t.attempt

-- name: claim_stale_received
-- `received` tasks nobody has sent for a while (rejected, lost, or their producer died):
-- restamp them so no other producer claims them again before the threshold passes.
WITH stale AS (
    SELECT id FROM tasks
    WHERE state = 'received' AND last_update_time < extract(epoch FROM statement_timestamp()) - %(age_s)s
    ORDER BY last_update_time
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE tasks AS t SET last_update_time = extract(epoch FROM statement_timestamp())
FROM stale WHERE t.id = stale.id
RETURNING t.id, t.type, t.value, t.creation_time, t.attempt

-- --- maintenance (daemons.maintenance): partitions ahead, retention, vacuum -----------

-- name: maintenance_lock
-- One maintainer at a time across every daemon; the others skip the pass.
SELECT pg_try_advisory_lock(hashtext('tasks maintenance'))

-- name: maintenance_unlock
SELECT pg_advisory_unlock(hashtext('tasks maintenance'))

-- name: ensure_partitions
SELECT tasks_ensure_partitions(%(width_s)s, %(ahead_s)s)

-- name: done_partitions
-- Attached done partitions, their bounds from their names (tasks_done_<lower>_<upper>),
-- and whether a DETACH ... CONCURRENTLY was interrupted half-way.
SELECT c.relname, split_part(c.relname, '_', 3)::bigint, split_part(c.relname, '_', 4)::bigint,
       i.inhdetachpending
FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid
WHERE i.inhparent = 'tasks_done'::regclass AND c.relname ~ '^tasks_done_[0-9]+_[0-9]+$'
ORDER BY 3

-- name: detached_partitions
-- Done partitions already detached but not yet dropped (a pass that stopped between).
SELECT c.relname FROM pg_class AS c
WHERE c.relname ~ '^tasks_done_[0-9]+_[0-9]+$' AND c.relkind = 'r' AND NOT c.relispartition
  AND c.relnamespace = (SELECT relnamespace FROM pg_class WHERE oid = 'tasks_done'::regclass)
ORDER BY 1

-- name: db_now
SELECT extract(epoch FROM clock_timestamp())

-- name: prune_task_keys
-- Idempotency keys kept as long as done tasks are; a bounded batch per pass.
DELETE FROM task_keys WHERE key IN (
    SELECT key FROM task_keys WHERE created < extract(epoch FROM statement_timestamp()) - %(retention_s)s
    ORDER BY created LIMIT 10000
)

-- name: vacuum_unfinished
-- SKIP_LOCKED: if autovacuum is at it already, this pass leaves it be.
VACUUM (SKIP_LOCKED) tasks_unfinished
