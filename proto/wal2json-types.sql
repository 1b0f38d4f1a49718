-- How wal2json format-version 2 prints each type (proto/capture-wal2json-types.sh): one
-- transaction per case, captured from a real server into wal2json-types.jsonl.
CREATE TABLE vals (
    id   int PRIMARY KEY,
    n    numeric, f4 real, f8 double precision,
    b    bytea, ba bytea[], na numeric[], fa float8[],
    j    json, jb jsonb,
    ts   timestamp, tstz timestamptz, iv interval, d date,
    ok   boolean, big bigint, o oid,
    t    text
);
CREATE DOMAIN num_dom AS numeric;
CREATE TABLE dom (id int PRIMARY KEY, n num_dom);
CREATE TABLE full_twins (a int, b text);
ALTER TABLE full_twins REPLICA IDENTITY FULL;
CREATE TABLE idx_ident (a int NOT NULL, b text);
CREATE UNIQUE INDEX idx_ident_a ON idx_ident (a);
ALTER TABLE idx_ident REPLICA IDENTITY USING INDEX idx_ident_a;
CREATE TABLE parent (id int PRIMARY KEY);
CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent (id));
CREATE TABLE part (id int, k int, v text, PRIMARY KEY (id, k)) PARTITION BY RANGE (k);
CREATE TABLE part_1 PARTITION OF part FOR VALUES FROM (0) TO (10);
CREATE TABLE part_2 PARTITION OF part FOR VALUES FROM (10) TO (20);
SELECT pg_create_logical_replication_slot('capture_types', 'wal2json');
SET extra_float_digits = 3;
SET DateStyle = 'ISO, MDY';
SET IntervalStyle = postgres;
SET TimeZone = 'UTC';
-- Exact values: huge numeric, float edge cases, bytea, arrays, json, date/time.
INSERT INTO vals VALUES (1, '123456789012345678901234567890.123456789012345678901234567890',
    '-0', '-1.7976931348623157e+308', '\x00ff5c22', ARRAY['\x00'::bytea, '\xff'],
    ARRAY[1.50, 'NaN', NULL]::numeric[], ARRAY['-0', 'Infinity', '5e-324']::float8[],
    '{"a": 1.0, "b": [1e400]}', '{"k": "v\"q", "n": 0.10}',
    '2024-02-29 12:34:56.789012', '0001-01-01 00:00:00+00 BC', '1 year 2 mons -3 days 04:05:06.7', 'infinity',
    true, 9007199254740993, 4294967295, E'quote" back\\ nl\n tab\t ü');
INSERT INTO vals (id, f4, f8) VALUES (4, '1.17549435e-38', '5e-324'), (5, '3.4028235e+38', '-0');
-- NaN and infinities in numeric, real, double precision: printed as null.
INSERT INTO vals (id, n, f4, f8) VALUES (2, 'NaN', 'Infinity', '-Infinity');
INSERT INTO vals (id, n, f4, f8) VALUES (3, 'Infinity', 'NaN', 'NaN');
-- A domain over numeric is printed as a string, NaN included.
INSERT INTO dom VALUES (1, 'NaN'), (2, '1.000');
-- A TOASTed value left unchanged by an update: absent from the new image.
UPDATE vals SET t = (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 400) g) WHERE id = 2;
UPDATE vals SET ok = false WHERE id = 2;
-- A key update, a delete.
UPDATE vals SET id = 30 WHERE id = 3;
DELETE FROM vals WHERE id = 30;
-- REPLICA IDENTITY FULL twins: the identity is the whole old row.
INSERT INTO full_twins VALUES (1, 'same'), (1, 'same');
DELETE FROM full_twins WHERE ctid = (SELECT ctid FROM full_twins LIMIT 1);
UPDATE full_twins SET b = 'other';
-- REPLICA IDENTITY USING INDEX without a primary key.
INSERT INTO idx_ident VALUES (1, 'x');
UPDATE idx_ident SET b = 'y';
UPDATE idx_ident SET a = 2;
DELETE FROM idx_ident;
-- Partitions: leaf tables; a row moving between partitions.
INSERT INTO part VALUES (1, 5, 'p1');
UPDATE part SET k = 15 WHERE id = 1;
-- TRUNCATE of tables joined by a foreign key: one T per table.
INSERT INTO parent VALUES (1); INSERT INTO child VALUES (1, 1);
TRUNCATE parent, child;
