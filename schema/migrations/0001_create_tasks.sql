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
