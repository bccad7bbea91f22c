SET LOCAL lock_timeout = '1s';
ALTER TABLE tasks_unfinished RESET (vacuum_truncate);
