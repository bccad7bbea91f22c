-- Back to 0001's single table, keeping every stored row (lifetime totals beyond the
-- stored rows are lost with task_totals).
ALTER TABLE tasks RENAME TO tasks_0002;

CREATE TABLE tasks (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    type             smallint NOT NULL CHECK (type BETWEEN 0 AND 9),
    value            smallint NOT NULL CHECK (value BETWEEN 0 AND 99),
    state            task_state NOT NULL DEFAULT 'received',
    creation_time    double precision NOT NULL,
    last_update_time double precision NOT NULL
);
INSERT INTO tasks (id, type, value, state, creation_time, last_update_time)
OVERRIDING SYSTEM VALUE
SELECT id, type, value, state, creation_time, last_update_time FROM tasks_0002;
SELECT setval(pg_get_serial_sequence('tasks', 'id'), coalesce((SELECT max(id) FROM tasks), 0) + 1, false);
DROP TABLE tasks_0002;
DROP SEQUENCE IF EXISTS task_ids;

CREATE INDEX tasks_unfinished_idx ON tasks (state, last_update_time) WHERE state <> 'done';
ALTER TABLE tasks SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_analyze_scale_factor = 0.01,
    autovacuum_vacuum_insert_scale_factor = 0.01
);

DROP FUNCTION tasks_ensure_partitions(double precision, double precision);
DROP TABLE task_totals;

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
        UPDATE task_counts SET received = received + d_received,
                               processing = processing + d_processing,
                               done = done + d_done
        WHERE id = 1;
    END IF;
    RETURN NULL;
END
$$;

UPDATE task_counts SET
    received = (SELECT count(*) FROM tasks WHERE state = 'received'),
    processing = (SELECT count(*) FROM tasks WHERE state = 'processing'),
    done = (SELECT count(*) FROM tasks WHERE state = 'done')
WHERE id = 1;

CREATE TRIGGER tasks_count_insert AFTER INSERT ON tasks
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION task_counts_apply();
CREATE TRIGGER tasks_count_update AFTER UPDATE ON tasks
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION task_counts_apply();
CREATE TRIGGER tasks_count_delete AFTER DELETE ON tasks
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION task_counts_apply();
