-- depends: 0002_partition_tasks
-- Fencing tokens: `attempt` counts the claims of a task. Every claim (received ->
-- processing) and every reclaim or release (processing -> received) bumps it, and
-- processing -> done / -> received succeed only for the attempt the writer holds, so an
-- owner whose lease was taken back changes nothing, and a retry after a lost reply can
-- tell "done by me" (its attempt) from "done by someone else".
--
-- Ordered before 0003 (the live migration, which comes and goes while the daemons run):
-- the daemons' queries need this column, so `migrator down` must never take it first.
-- A constant default adds the column without rewriting any partition.
SET LOCAL lock_timeout = '1s';
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS attempt integer NOT NULL DEFAULT 0;

-- Idempotency keys of client submissions (Submit with id 0 and a key): a retried call
-- with the same key finds its task instead of making a second one. Kept as long as done
-- tasks are (TASKS_RETENTION), by the maintenance loop; `created` is the database's clock.
CREATE TABLE IF NOT EXISTS task_keys (
    key     text PRIMARY KEY,
    id      bigint NOT NULL,
    created double precision NOT NULL DEFAULT extract(epoch FROM statement_timestamp())
);
CREATE INDEX IF NOT EXISTS task_keys_created_idx ON task_keys (created);
