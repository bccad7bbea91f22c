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
UPDATE tasks AS t SET state = 'done', last_update_time = %(now)s
FROM unnest(%(ids)s::bigint[]) AS u(id)
WHERE t.id = u.id AND t.state = 'processing'
RETURNING t.id

-- name: release_processing
-- Work a draining consumer could not finish goes back to `received`, stamped with its
-- creation time so the next redelivery sweep picks it up at once.
UPDATE tasks SET state = 'received', last_update_time = creation_time
WHERE id = ANY(%(ids)s::bigint[]) AND state = 'processing'
RETURNING id

-- name: ping
SELECT 1

-- name: existing_ids
SELECT id FROM tasks WHERE id = ANY(%(ids)s::bigint[])

-- name: count_unfinished
-- task_counts is kept exact by triggers (migration 0001): no scan at any table size.
SELECT received + processing FROM task_counts WHERE id = 1

-- name: count_by_state
SELECT received, processing, done FROM task_counts WHERE id = 1

-- name: done_totals_by_type
SELECT type, count(*), coalesce(sum(value), 0) FROM tasks WHERE state = 'done' GROUP BY type

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
