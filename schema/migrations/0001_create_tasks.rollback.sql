DROP TABLE tasks;
DROP FUNCTION task_counts_apply();
DROP TABLE task_counts;
DROP TYPE task_state;
