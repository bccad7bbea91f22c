-- Back to one counts row and one totals row per type: the shards are folded into shard
-- 1 (under exclusive locks, so no writer counts into a shard meanwhile), then 0002's
-- trigger body. Writers are held first, as in 0005.
SET LOCAL lock_timeout = '1s';
LOCK TABLE tasks IN SHARE MODE;
LOCK TABLE task_counts, task_totals IN ACCESS EXCLUSIVE MODE;

UPDATE task_counts SET received = s.r, processing = s.p, done = s.d
FROM (SELECT sum(received) AS r, sum(processing) AS p, sum(done) AS d FROM task_counts) AS s
WHERE id = 1;
DELETE FROM task_counts WHERE id <> 1;
ALTER TABLE task_counts DROP CONSTRAINT task_counts_id_check;
ALTER TABLE task_counts ADD CONSTRAINT task_counts_id_check CHECK (id = 1);

UPDATE task_totals AS t SET done = s.n, value_sum = s.v
FROM (SELECT type, sum(done) AS n, sum(value_sum) AS v FROM task_totals GROUP BY type) AS s
WHERE t.type = s.type AND t.shard = 1;
DELETE FROM task_totals WHERE shard <> 1;
ALTER TABLE task_totals DROP CONSTRAINT task_totals_pkey;
ALTER TABLE task_totals DROP COLUMN shard;
ALTER TABLE task_totals ADD PRIMARY KEY (type);

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
