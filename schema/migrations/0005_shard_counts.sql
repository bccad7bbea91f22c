-- depends: 0003_add_comment
-- No row that every writer must lock (README, "When the database misbehaves"). Until
-- now each writing statement's trigger updated the one `task_counts` row, and each done
-- statement the `task_totals` row of every type it touched, so one transaction held open
-- anywhere (an operator fixing rows by hand in psql) stopped every writer until it ended.
-- Both are now spread over 16 shards and summed on read (16 and 160 rows, however long
-- the history). A statement counts into the first shard nobody else holds (FOR UPDATE
-- SKIP LOCKED), starting from one its backend picks, so writers neither wait for each
-- other nor for a stranger's transaction; only if all 16 are held does it wait, for its
-- own, under the daemons' lock_timeout. The queries sum whatever rows there are, so they
-- work on both sides of this migration while it comes and goes.
--
-- Writers first: a statement that changed rows of `tasks` runs its trigger with the
-- function body it loaded then, so none may be between the two while the body and the
-- tables change (an old body would add a batch to all 16 totals shards of a type, a new
-- one would name a column that is gone). SHARE waits for the writing statements in
-- flight and holds new ones until commit; readers go on. Then the counts, in the order
-- every writer takes them (tasks, then the counts), so no deadlock.
SET LOCAL lock_timeout = '1s';
LOCK TABLE tasks IN SHARE MODE;
LOCK TABLE task_counts, task_totals IN ACCESS EXCLUSIVE MODE;

ALTER TABLE task_counts DROP CONSTRAINT task_counts_id_check;
ALTER TABLE task_counts ADD CONSTRAINT task_counts_id_check CHECK (id BETWEEN 0 AND 15);
INSERT INTO task_counts (id, received, processing, done)
SELECT s, 0, 0, 0 FROM generate_series(0, 15) AS s WHERE s <> 1;

-- The rows so far become shard 1, the shard of task_counts' row so far.
ALTER TABLE task_totals ADD COLUMN shard smallint NOT NULL DEFAULT 1
    CHECK (shard BETWEEN 0 AND 15);
ALTER TABLE task_totals ALTER COLUMN shard DROP DEFAULT;
ALTER TABLE task_totals DROP CONSTRAINT task_totals_pkey;
ALTER TABLE task_totals ADD PRIMARY KEY (type, shard);
INSERT INTO task_totals (type, shard, done, value_sum)
SELECT t, s, 0, 0 FROM generate_series(0, 9) AS t, generate_series(0, 15) AS s WHERE s <> 1;

CREATE OR REPLACE FUNCTION task_counts_apply() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    d_received bigint := 0;
    d_processing bigint := 0;
    d_done bigint := 0;
    r bigint;
    p bigint;
    d bigint;
    my_shard smallint;
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
    IF (d_received, d_processing, d_done) = (0, 0, 0) THEN
        RETURN NULL;  -- nothing changed state (a restamp): no shard taken
    END IF;
    -- The counts shard comes first in every writing statement, and the totals rows of a
    -- shard are only written by its holder: no lock-order deadlock between them.
    UPDATE task_counts SET received = received + d_received,
                           processing = processing + d_processing,
                           done = done + d_done
    WHERE id = (SELECT c.id FROM task_counts AS c
                ORDER BY (c.id + pg_backend_pid()) % 16 LIMIT 1 FOR UPDATE SKIP LOCKED)
    RETURNING id INTO my_shard;
    IF my_shard IS NULL THEN  -- every shard held: wait for this backend's own
        my_shard := pg_backend_pid() % 16;
        UPDATE task_counts SET received = received + d_received,
                               processing = processing + d_processing,
                               done = done + d_done
        WHERE id = my_shard;
    END IF;
    -- Lifetime totals follow tasks into done (and out of it, by hand); a DELETE, like
    -- retention, leaves them alone.
    IF TG_OP = 'INSERT' AND d_done <> 0 THEN
        UPDATE task_totals AS t SET done = t.done + x.n, value_sum = t.value_sum + x.s
        FROM (SELECT type, count(*) AS n, sum(value) AS s FROM new_rows
              WHERE state = 'done' GROUP BY type) AS x
        WHERE t.type = x.type AND t.shard = my_shard;
    ELSIF TG_OP = 'UPDATE' AND d_done <> 0 THEN
        UPDATE task_totals AS t SET done = t.done + x.n, value_sum = t.value_sum + x.s
        FROM (SELECT type, sum(n) AS n, sum(s) AS s FROM (
                  SELECT type, count(*) AS n, sum(value) AS s FROM new_rows
                  WHERE state = 'done' GROUP BY type
                  UNION ALL
                  SELECT type, -count(*), -sum(value) FROM old_rows
                  WHERE state = 'done' GROUP BY type) AS both_sides
              GROUP BY type) AS x
        WHERE t.type = x.type AND t.shard = my_shard AND x.n <> 0;
    END IF;
    RETURN NULL;
END
$$;
