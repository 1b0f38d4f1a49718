-- Every message kind, one scripted transaction at a time (proto/capture.sh).
-- Insert, with a TOASTed value (random md5 text does not compress below the TOAST threshold).
INSERT INTO items VALUES (1, 'first', (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 400) g), 1.50, 'happy'),
                         (2, 'second', NULL, 'NaN', NULL);
-- Update of a non-key column: the TOASTed column arrives as 'u' (unchanged).
UPDATE items SET name = 'first!' WHERE id = 1;
-- Update of the key: the old key arrives as a 'K' tuple.
UPDATE items SET id = 20 WHERE id = 2;
-- Delete: the old key.
DELETE FROM items WHERE id = 20;
-- REPLICA IDENTITY FULL: 'O' tuples with the whole old row.
INSERT INTO full_rows VALUES (1, 'a');
UPDATE full_rows SET b = 'b' WHERE a = 1;
DELETE FROM full_rows WHERE a = 1;
-- A rolled-back transaction sends nothing.
BEGIN; INSERT INTO items VALUES (99, 'never'); ROLLBACK;
-- Logical messages, transactional and not.
SELECT pg_logical_emit_message(true, 'pgtide', 'in a transaction');
SELECT pg_logical_emit_message(false, 'pgtide', 'outside any transaction');
-- TRUNCATE with CASCADE and RESTART IDENTITY.
INSERT INTO parent VALUES (1); INSERT INTO child VALUES (1, 1); INSERT INTO counters (n) VALUES (1);
TRUNCATE parent, counters RESTART IDENTITY CASCADE;
-- A transaction with a replication origin: an Origin message.
SELECT pg_replication_origin_create('pgtide_capture');
SELECT pg_replication_origin_session_setup('pgtide_capture');
BEGIN;
SELECT pg_replication_origin_xact_setup('0/AB', now());
INSERT INTO items VALUES (3, 'from an origin', NULL, 3, 'ok');
COMMIT;
SELECT pg_replication_origin_session_reset();
-- A transaction larger than logical_decoding_work_mem = 64kB: streamed in the v2 capture.
INSERT INTO items SELECT g, 'bulk ' || g, NULL, g, 'sad' FROM generate_series(100, 3000) g;
-- A streamed transaction that aborts.
BEGIN; INSERT INTO items SELECT g, 'aborted ' || g, NULL, g, 'sad' FROM generate_series(5000, 8000) g; ROLLBACK;
