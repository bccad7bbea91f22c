-- depends: 0004_task_attempts
-- (before 0003 in the chain, so `migrator down` still takes 0005 and 0003 first.)
-- The hot partition keeps its pages: no vacuum (the maintenance loop's every 2 s, or
-- autovacuum's) truncates its empty tail. Its size follows the backlog, so pages emptied
-- now are filled again within seconds, and to truncate, a vacuum takes ACCESS EXCLUSIVE
-- on it, again and again while it scans back for the last page in use: under load it
-- sat in that phase for up to 4 s at a time, each grab holding every insert and update
-- (the soak's minutes of 700 ms p99, at +35 % PostgreSQL CPU per task). Setting a
-- storage parameter takes SHARE UPDATE EXCLUSIVE: writers go on meanwhile.
SET LOCAL lock_timeout = '1s';
ALTER TABLE tasks_unfinished SET (vacuum_truncate = false);
