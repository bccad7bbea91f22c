-- depends: 0001_create_tasks
-- A nullable column: adding it takes no table rewrite, and the daemons' queries name
-- their columns, so they keep working while it comes and goes.
ALTER TABLE tasks ADD COLUMN comment text;
