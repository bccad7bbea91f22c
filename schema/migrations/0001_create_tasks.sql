-- The task table and its state machine: received -> processing -> done.
CREATE TYPE task_state AS ENUM ('received', 'processing', 'done');

CREATE TABLE tasks (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    type             smallint NOT NULL CHECK (type BETWEEN 0 AND 9),
    value            smallint NOT NULL CHECK (value BETWEEN 0 AND 99),
    state            task_state NOT NULL DEFAULT 'received',
    creation_time    double precision NOT NULL,  -- unix seconds
    last_update_time double precision NOT NULL   -- unix seconds; also the lease stamp
);

-- Serves every query about unfinished work (backlog count, redelivery sweep, lease
-- reclaim) and stays small: done rows, the vast majority, are not in it.
CREATE INDEX tasks_unfinished_idx ON tasks (state, last_update_time) WHERE state <> 'done';

-- Every task is inserted and updated twice within seconds: vacuum and analyze after 1 %
-- of the table changed (default 20 %), so the unfinished-task index stays small and the
-- planner keeps knowing that few tasks are unfinished as the table grows.
ALTER TABLE tasks SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_analyze_scale_factor = 0.01,
    autovacuum_vacuum_insert_scale_factor = 0.01
);

-- Tasks per state, kept exact by statement-level triggers for every writer (the daemons,
-- psql, a migration): the backlog check and the tasks-per-state gauge read one row
-- instead of counting through an index that churns with every task. One row, so each
-- statement takes one row lock (no lock-order deadlocks between statements).
CREATE TABLE task_counts (
    id         smallint PRIMARY KEY CHECK (id = 1),
    received   bigint NOT NULL,
    processing bigint NOT NULL,
    done       bigint NOT NULL
);
INSERT INTO task_counts VALUES (1, 0, 0, 0);

CREATE FUNCTION task_counts_apply() RETURNS trigger LANGUAGE plpgsql AS $$
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
        UPDATE task_counts SET received = received + d_received,
                               processing = processing + d_processing,
                               done = done + d_done
        WHERE id = 1;
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
