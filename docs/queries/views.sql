-- phigate records as DuckDB views. Run first, after setting where the records are:
--
--   SET VARIABLE records = '/var/lib/phigate/records';   -- or a copy of it
--   .read docs/queries/views.sql
--
-- Every table is a hive-partitioned Parquet dataset: <records>/<table>/date=YYYY-MM-DD/*.parquet.
-- The `date` column comes from the partition (UTC) and lets DuckDB skip whole days.
-- Only files with a signed manifest are complete; `*.parquet.tmp` never matches the glob.
-- `approvals` has files only once an approval rule has fired: until then its view
-- cannot be created (DuckDB: "No files found") and the other views still work.

CREATE OR REPLACE VIEW requests AS
    SELECT * FROM read_parquet(getvariable('records') || '/requests/*/*.parquet',
                               hive_partitioning = true, union_by_name = true);
CREATE OR REPLACE VIEW connections AS
    SELECT * FROM read_parquet(getvariable('records') || '/connections/*/*.parquet',
                               hive_partitioning = true, union_by_name = true);
CREATE OR REPLACE VIEW events AS
    SELECT * FROM read_parquet(getvariable('records') || '/events/*/*.parquet',
                               hive_partitioning = true, union_by_name = true);
CREATE OR REPLACE VIEW approvals AS
    SELECT * FROM read_parquet(getvariable('records') || '/approvals/*/*.parquet',
                               hive_partitioning = true, union_by_name = true);
