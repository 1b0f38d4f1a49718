#!/usr/bin/env bash
# Re-captures the golden change streams in proto/ from a real server: starts a throwaway
# source cluster (scripts/clusters.sh), runs proto/workload.sql against it and reads the
# slots with the SQL peek functions, which return each message exactly as the plugin wrote
# it (independently of pgtide's own client):
#   pgoutput-v1.hex            proto_version 1: "LSN XID HEX" per message
#   pgoutput-v2-stream.hex     proto_version 2 with streaming: large transactions in chunks
#   wal2json-v2.jsonl          wal2json format-version 2: one JSON object per line
#   pgoutput-v1-pg<N>.hex      proto_version 1 from PostgreSQL N (clusters of the other majors
#                              from scripts/install-pg.sh; no `messages` option before 14)
# Usage: proto/capture.sh [MAJOR…]  (default 12 18; then review `git diff proto/` and commit)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/clusters.sh
pgtide_install_deps
trap pgtide_stop_clusters EXIT
pgtide_start_clusters
psql_src() { pgtide_psql source capture "$@"; }
pgtide_psql source postgres -c "CREATE DATABASE capture"
psql_src -f proto/schema.sql >/dev/null
psql_src -c "CREATE PUBLICATION pgtide_capture FOR ALL TABLES" >/dev/null
psql_src -c "SELECT pg_create_logical_replication_slot('capture_v1', 'pgoutput')" \
         -c "SELECT pg_create_logical_replication_slot('capture_v2', 'pgoutput')" \
         -c "SELECT pg_create_logical_replication_slot('capture_json', 'wal2json')" >/dev/null
psql_src -f proto/workload.sql >/dev/null
# The test clusters commit asynchronously; peek reads only flushed WAL.
psql_src -c CHECKPOINT >/dev/null
psql_src -At -c "SELECT lsn || ' ' || xid || ' ' || encode(data, 'hex') FROM pg_logical_slot_peek_binary_changes('capture_v1', NULL, NULL, 'proto_version', '1', 'publication_names', 'pgtide_capture', 'messages', 'true')" > proto/pgoutput-v1.hex
psql_src -At -c "SET logical_decoding_work_mem = '64kB'" -c "SELECT lsn || ' ' || xid || ' ' || encode(data, 'hex') FROM pg_logical_slot_peek_binary_changes('capture_v2', NULL, NULL, 'proto_version', '2', 'publication_names', 'pgtide_capture', 'messages', 'true', 'streaming', 'on')" | grep -v '^SET$' > proto/pgoutput-v2-stream.hex
psql_src -At -c "SELECT data FROM pg_logical_slot_peek_changes('capture_json', NULL, NULL, 'format-version', '2', 'include-xids', '1', 'include-timestamp', '1', 'include-lsn', '1', 'include-transaction', '1', 'include-type-oids', '1', 'include-pk', '1')" > proto/wal2json-v2.jsonl
# pgoutput v1 as other majors write it, from the same schema and workload.
majors=("$@"); [ ${#majors[@]} -gt 0 ] || majors=(12 18)
pgtide_start_version_clusters "${majors[@]}"
for major in "${majors[@]}"; do
  uri_var="PGTIDE_TEST_PG$major"
  base=${!uri_var%/*}
  psql_v() { "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -d "$base/capture" "$@"; }
  "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -d "${!uri_var}" -c "CREATE DATABASE capture"
  psql_v -f proto/schema.sql >/dev/null
  psql_v -c "CREATE PUBLICATION pgtide_capture FOR ALL TABLES" >/dev/null
  psql_v -c "SELECT pg_create_logical_replication_slot('capture_v1', 'pgoutput')" >/dev/null
  psql_v -f proto/workload.sql >/dev/null
  psql_v -c CHECKPOINT >/dev/null
  messages=""; [ "$major" -ge 14 ] && messages=", 'messages', 'true'"
  psql_v -At -c "SELECT lsn || ' ' || xid || ' ' || encode(data, 'hex') FROM pg_logical_slot_peek_binary_changes('capture_v1', NULL, NULL, 'proto_version', '1', 'publication_names', 'pgtide_capture'$messages)" > "proto/pgoutput-v1-pg$major.hex"
done
wc -l proto/*.hex proto/*.jsonl
