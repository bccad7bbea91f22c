SET LOCAL lock_timeout = '1s';
DROP TABLE IF EXISTS task_keys;
ALTER TABLE tasks DROP COLUMN attempt;
