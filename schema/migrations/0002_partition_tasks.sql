-- depends: 0001_create_tasks
-- The layout for a long life (README, "Long life"): `tasks` is partitioned by state.
--
--   tasks                LIST (state)
--   ├─ tasks_unfinished  received, processing: small (about the backlog), hot
--   └─ tasks_done        done, RANGE (last_update_time = done time, the database's clock)
--      ├─ tasks_done_0_<t>          MINVALUE .. t: the done rows from before this layout
--      └─ tasks_done_<lo>_<hi> ...  one per window, created ahead by the maintenance loop
--
-- The `done` transition stays one conditional UPDATE: PostgreSQL moves the row into the
-- partition of its done time. The hot partition holds only unfinished work, so the cost
-- of a task does not grow with history, and retention removes a whole done partition
-- (detach, drop) without touching a row, never an unfinished task.
--
-- Upgrading a database with many rows copies them once, inside this migration.

-- Waiting for the table behind a running daemon or reader would stall every writer.
SET LOCAL lock_timeout = '5s';
ALTER TABLE tasks RENAME TO tasks_0001;

CREATE SEQUENCE task_ids AS bigint;
SELECT setval('task_ids', coalesce((SELECT max(id) FROM tasks_0001), 0) + 1, false);

CREATE TABLE tasks (
    id               bigint NOT NULL DEFAULT nextval('task_ids'),
    type             smallint NOT NULL CHECK (type BETWEEN 0 AND 9),
    value            smallint NOT NULL CHECK (value BETWEEN 0 AND 99),
    state            task_state NOT NULL DEFAULT 'received',
    creation_time    double precision NOT NULL,  -- unix seconds
    last_update_time double precision NOT NULL   -- unix seconds; lease stamp; done time
) PARTITION BY LIST (state);
ALTER SEQUENCE task_ids OWNED BY tasks.id;

-- Rows here are inserted, updated once and moved out within seconds. Only the primary
-- key indexes them: received -> processing changes no indexed column, so it is a HOT
-- update into the room fillfactor leaves on the page (an index on (state, stamp) made
-- every update write two index entries and let the planner scan all unfinished tasks
-- per batch: README, "Long life"). The redelivery sweep scans this small table instead.
-- The maintenance loop vacuums it every pass: autovacuum looks at a database about once
-- a minute, long enough for millions of dead rows at bench rates.
CREATE TABLE tasks_unfinished PARTITION OF tasks (PRIMARY KEY (id))
    FOR VALUES IN ('received', 'processing')
    WITH (fillfactor = 70);

CREATE TABLE tasks_done PARTITION OF tasks FOR VALUES IN ('done')
    PARTITION BY RANGE (last_update_time);
-- Answers "is this id known?" (DUPLICATE vs unknown id) for done tasks.
CREATE INDEX tasks_done_id_idx ON tasks_done (id);

DO $$
DECLARE
    upper_bound bigint;
BEGIN
    SELECT ceil(greatest(extract(epoch FROM now()), coalesce(max(last_update_time), 0)) + 1)
    INTO upper_bound FROM tasks_0001 WHERE state = 'done';
    EXECUTE format(
        'CREATE TABLE %I PARTITION OF tasks_done FOR VALUES FROM (MINVALUE) TO (%s)',
        'tasks_done_0_' || upper_bound, upper_bound
    );
    IF EXISTS (
        SELECT 1 FROM pg_attribute
        WHERE attrelid = 'tasks_0001'::regclass AND attname = 'comment' AND NOT attisdropped
    ) THEN
        -- a database that had `comment` from before it was migration 0003
        ALTER TABLE tasks ADD COLUMN comment text;
        EXECUTE 'INSERT INTO tasks (id, type, value, state, creation_time, last_update_time, comment)'
            ' SELECT id, type, value, state, creation_time, last_update_time, comment FROM tasks_0001';
    ELSE
        INSERT INTO tasks (id, type, value, state, creation_time, last_update_time)
        SELECT id, type, value, state, creation_time, last_update_time FROM tasks_0001;
    END IF;
END
$$;

DROP TABLE tasks_0001;

UPDATE task_counts SET
    received = (SELECT count(*) FROM tasks WHERE state = 'received'),
    processing = (SELECT count(*) FROM tasks WHERE state = 'processing'),
    done = (SELECT count(*) FROM tasks WHERE state = 'done')
WHERE id = 1;

-- Lifetime totals per type: kept by the same trigger as the counts, in the statement
-- that moves a task to done, and never touched by retention (dropping a partition fires
-- no trigger). task_counts.done is what is stored; task_totals is what ever was done.
CREATE TABLE task_totals (
    type      smallint PRIMARY KEY CHECK (type BETWEEN 0 AND 9),
    done      bigint NOT NULL,
    value_sum bigint NOT NULL
);
INSERT INTO task_totals (type, done, value_sum)
SELECT t, count(k.id), coalesce(sum(k.value), 0)
FROM generate_series(0, 9) AS t LEFT JOIN tasks AS k ON k.type = t AND k.state = 'done'
GROUP BY t;

CREATE OR REPLACE FUNCTION task_counts_apply() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    d_received bigint := 0;
    d_processing bigint := 0;
    d_done bigint := 0;
    r bigint;
    p bigint;
    d bigint;
BEGIN
    IF TG_OP <> 'DELETE' THEN
        SELECT count(*) FILTER (WHERE state = 'received'),
               count(*) FILTER (WHERE state = 'processing'),
               count(*) FILTER (WHERE state = 'done')
        INTO r, p, d FROM new_rows;
        d_received := r; d_processing := p; d_done := d;
    END IF;
    IF TG_OP <> 'INSERT' THEN
        SELECT count(*) FILTER (WHERE state = 'received'),
               count(*) FILTER (WHERE state = 'processing'),
               count(*) FILTER (WHERE state = 'done')
        INTO r, p, d FROM old_rows;
        d_received := d_received - r; d_processing := d_processing - p; d_done := d_done - d;
    END IF;
    IF (d_received, d_processing, d_done) <> (0, 0, 0) THEN
        -- This row lock comes first in every writing statement, so the task_totals rows
        -- below are only ever locked by its holder: no lock-order deadlock between them.
        UPDATE task_counts SET received = received + d_received,
                               processing = processing + d_processing,
                               done = done + d_done
        WHERE id = 1;
    END IF;
    -- Lifetime totals follow tasks into done (and out of it, by hand); a DELETE, like
    -- retention, leaves them alone.
    IF TG_OP = 'INSERT' AND d_done <> 0 THEN
        UPDATE task_totals AS t SET done = t.done + x.n, value_sum = t.value_sum + x.s
        FROM (SELECT type, count(*) AS n, sum(value) AS s FROM new_rows
              WHERE state = 'done' GROUP BY type) AS x
        WHERE t.type = x.type;
    ELSIF TG_OP = 'UPDATE' AND d_done <> 0 THEN
        UPDATE task_totals AS t SET done = t.done + x.n, value_sum = t.value_sum + x.s
        FROM (SELECT type, sum(n) AS n, sum(s) AS s FROM (
                  SELECT type, count(*) AS n, sum(value) AS s FROM new_rows
                  WHERE state = 'done' GROUP BY type
                  UNION ALL
                  SELECT type, -count(*), -sum(value) FROM old_rows
                  WHERE state = 'done' GROUP BY type) AS both_sides
              GROUP BY type) AS x
        WHERE t.type = x.type AND x.n <> 0;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER tasks_count_insert AFTER INSERT ON tasks
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION task_counts_apply();
CREATE TRIGGER tasks_count_update AFTER UPDATE ON tasks
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION task_counts_apply();
CREATE TRIGGER tasks_count_delete AFTER DELETE ON tasks
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION task_counts_apply();

-- Done partitions up to `ahead_s` past now, continuing the chain from the highest upper
-- bound (so ranges never overlap, whatever width each caller uses) and filling a gap
-- left while nothing ran with one partition, so the chain has no hole a row could fall
-- into. A partition is made empty and then attached: ATTACH takes a lock that lets
-- reads and writes of tasks_done go on (CREATE TABLE ... PARTITION OF would not).
-- Names carry the bounds: tasks_done_<lower>_<upper>, unix seconds.
CREATE FUNCTION tasks_ensure_partitions(width_s double precision, ahead_s double precision)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    now_s double precision := extract(epoch FROM clock_timestamp());
    width bigint := greatest(1, ceil(width_s))::bigint;
    horizon bigint := ceil(now_s + greatest(ahead_s, width_s))::bigint;
    lo bigint;
    hi bigint;
    part text;
    made integer := 0;
BEGIN
    -- One creator at a time (the maintenance loop, or a write that found no partition),
    -- so two never make the same one; the chain's end is read once the lock is held.
    PERFORM pg_advisory_xact_lock(hashtext('tasks partitions'));
    SELECT max(split_part(c.relname, '_', 4)::bigint) INTO lo
    FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid
    WHERE i.inhparent = 'tasks_done'::regclass AND c.relname ~ '^tasks_done_[0-9]+_[0-9]+$';
    IF lo IS NULL THEN
        lo := floor(now_s / width)::bigint * width;
    END IF;
    WHILE lo < horizon LOOP
        hi := (lo / width + 1) * width;
        IF hi <= now_s - width THEN
            hi := floor(now_s / width)::bigint * width;  -- one partition spans the gap
        END IF;
        part := 'tasks_done_' || lo || '_' || hi;
        EXECUTE format(
            'CREATE TABLE %I (LIKE tasks_done INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', part
        );
        EXECUTE format(
            'ALTER TABLE tasks_done ATTACH PARTITION %I FOR VALUES FROM (%s) TO (%s)',
            part, lo, hi
        );
        made := made + 1;
        lo := hi;
    END LOOP;
    RETURN made;
END
$$;

-- Ten minutes of one-minute windows, so a database that was just migrated takes done
-- tasks before any daemon's maintenance loop has run (the loop then continues with its
-- own width). Short ones: a short retention can drop them soon after they end.
SELECT tasks_ensure_partitions(60, 600);
