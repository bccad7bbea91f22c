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
