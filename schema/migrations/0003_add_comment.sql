-- depends: 0006_hot_partition_keeps_its_pages
-- (applied after 0004, which the daemons need, and 0006, so `migrator down` takes this
-- one, or 0005, which the daemons also run on both sides of, before them.)
-- The live migration: a nullable column, added while the daemons run. Adding it takes no
-- table rewrite, and the daemons' queries name their columns, so they keep working while
-- it comes and goes. It was 0002 before the partitioned layout: IF NOT EXISTS makes it a
-- no-op on a database that had it under that name.
-- lock_timeout: ALTER TABLE needs an exclusive lock on every partition, and while it waits
-- (behind an operator's long transaction, say) every writer queues behind it. Waiting at
-- most 1 s and failing lets the pipeline flow again; the migrator retries with backoff.
SET LOCAL lock_timeout = '1s';
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS comment text;
