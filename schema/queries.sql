-- Every runtime query, one named block each ("-- name: <name>"), loaded once by
-- daemons.store. Queries name their columns, so a column added or dropped by a live
-- migration (0002: comment) never breaks a running daemon. Every state transition is
-- conditional on the expected state: a late or duplicate delivery changes nothing.

-- name: insert_batch
-- One statement per batch; RETURNING gives each row back with its id (no reliance on
-- the order of RETURNING).
INSERT INTO tasks (type, value, state, creation_time, last_update_time)
SELECT u.type, u.value, %(state)s::task_state, u.creation_time, %(now)s
FROM unnest(%(types)s::smallint[], %(values)s::smallint[], %(creation_times)s::float8[])
     AS u(type, value, creation_time)
RETURNING id, type, value, creation_time

-- name: mark_processing
-- Driven from the id list (primary-key lookups): `id = ANY(...) AND state = ...` lets
-- the planner prefer the state index once statistics say few rows are unfinished, and
-- that plan scans every unfinished task for each batch.
UPDATE tasks AS t SET state = 'processing', last_update_time = %(now)s
FROM unnest(%(ids)s::bigint[]) AS u(id)
WHERE t.id = u.id AND t.state = 'received'
RETURNING t.id, t.type, t.value, t.creation_time

-- name: mark_done
-- Moves each row into the done partition of its done time: the database's clock, so a
-- host with a wrong clock cannot put rows where retention would miss them.
UPDATE tasks AS t SET state = 'done', last_update_time = extract(epoch FROM statement_timestamp())
FROM unnest(%(ids)s::bigint[]) AS u(id)
WHERE t.id = u.id AND t.state = 'processing'
RETURNING t.id

-- name: release_processing
-- Work a draining consumer could not finish goes back to `received`, stamped 0 so the
-- next redelivery sweep picks it up at once (its creation time, a client's word, may
-- lie in the future).
UPDATE tasks SET state = 'received', last_update_time = 0
WHERE id = ANY(%(ids)s::bigint[]) AND state = 'processing'
RETURNING id

-- name: ping
SELECT 1

-- name: existing_ids
SELECT id FROM tasks WHERE id = ANY(%(ids)s::bigint[])

-- name: count_unfinished
-- task_counts is kept exact by triggers (migration 0001), in shards (0004) summed here:
-- 16 rows at any table size (one before 0004: the sums work on both).
SELECT sum(received + processing)::bigint FROM task_counts

-- name: count_by_state
SELECT sum(received)::bigint, sum(processing)::bigint, sum(done)::bigint FROM task_counts

-- name: done_totals_by_type
-- Lifetime totals (migration 0002), in shards (0004): 160 rows, whatever the history or
-- the retention.
SELECT type, sum(done)::bigint, sum(value_sum)::bigint FROM task_totals GROUP BY type ORDER BY type

-- name: take_off_done
-- Done rows removed by retention leave the stored-done count, in a shard nobody holds
-- (shard 1 if every one is held, or before 0004).
UPDATE task_counts SET done = done - %(n)s
WHERE id = coalesce((SELECT c.id FROM task_counts AS c
                     ORDER BY (c.id + pg_backend_pid()) %% 16 LIMIT 1 FOR UPDATE SKIP LOCKED), 1)

-- name: reclaim_expired
-- Leases: a `processing` task not finished by its deadline belonged to a consumer that
-- died mid-work. SKIP LOCKED lets several producers sweep without resending the same task.
WITH expired AS (
    SELECT id FROM tasks
    WHERE state = 'processing' AND last_update_time < %(before)s
    ORDER BY last_update_time
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE tasks AS t SET state = 'received', last_update_time = %(now)s
FROM expired WHERE t.id = expired.id
RETURNING t.id, t.type, t.value, t.creation_time

-- name: claim_stale_received
-- `received` tasks nobody has sent for a while (rejected, lost, or their producer died):
-- restamp them so no other producer claims them again before the threshold passes.
WITH stale AS (
    SELECT id FROM tasks
    WHERE state = 'received' AND last_update_time < %(before)s
    ORDER BY last_update_time
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE tasks AS t SET last_update_time = %(now)s
FROM stale WHERE t.id = stale.id
RETURNING t.id, t.type, t.value, t.creation_time

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

-- name: vacuum_unfinished
-- SKIP_LOCKED: if autovacuum is at it already, this pass leaves it be.
VACUUM (SKIP_LOCKED) tasks_unfinished
