-- Runs after 01-hard-cases.sql in the compose source: the tables without a primary key get a
-- replica identity, which pgtide requires before it publishes them.
ALTER TABLE no_pk REPLICA IDENTITY FULL;
ALTER TABLE slots REPLICA IDENTITY FULL;
