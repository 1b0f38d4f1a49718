#!/usr/bin/env bash
# Captures how wal2json format-version 2 prints each type (proto/wal2json-types.sql) from a
# throwaway source cluster, with the options pgtide's receiver uses, into
# proto/wal2json-types.jsonl (one JSON object per line, exactly as the plugin wrote it).
# Usage: proto/capture-wal2json-types.sh   (then review `git diff proto/` and commit)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/clusters.sh
pgtide_install_deps
trap pgtide_stop_clusters EXIT
pgtide_start_clusters
pgtide_psql source postgres -c "CREATE DATABASE capture"
pgtide_psql source capture -f proto/wal2json-types.sql >/dev/null
pgtide_psql source capture -c CHECKPOINT >/dev/null
pgtide_psql source capture -At -c "SET extra_float_digits = 3" -c "SET DateStyle = 'ISO, MDY'" -c "SET IntervalStyle = postgres" -c "SET TimeZone = 'UTC'" -c "SET bytea_output = hex" \
  -c "SELECT data FROM pg_logical_slot_peek_changes('capture_types', NULL, NULL, 'format-version', '2', 'include-xids', '1', 'include-timestamp', '1', 'include-lsn', '1', 'include-transaction', '1', 'include-type-oids', '1', 'include-pk', '1')" \
  | grep -v '^SET$' > proto/wal2json-types.jsonl
wc -l proto/wal2json-types.jsonl
