#!/usr/bin/env bash
# On demand: pgtide clone of a TOAST-heavy table (100,000 rows of text + jsonb, ~290 MB) with
# --toast-compression lz4 (the default) against keep (the target's pglz), twice each, on a PG15
# pair started here; prints wall time and target size per run.   scripts/bench-toast.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
source scripts/clusters.sh
pgtide_install_deps
PGTIDE=$PWD/target/release/pgtide
export PGTIDE_CLUSTER_TUNING=bench
trap pgtide_stop_clusters EXIT
pgtide_start_clusters
export PGPASSWORD=$PGTIDE_TEST_PASSWORD
S="postgres://postgres@127.0.0.1:$PGTIDE_SOURCE_PORT"
T="postgres://postgres@127.0.0.1:$PGTIDE_TARGET_PORT"
psql_s() { "$PGTIDE_PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 "$@"; }
psql_s "$S/postgres" -c "CREATE DATABASE toast"
psql_s "$S/toast" -c "CREATE TABLE docs (id int PRIMARY KEY, body text, meta jsonb);
  INSERT INTO docs SELECT g, repeat(md5(g::text) || ' lorem ipsum dolor sit amet ' || (g % 97)::text, 120),
    jsonb_build_object('k', g, 'tags', (SELECT jsonb_agg(md5((g*i)::text)) FROM generate_series(1, 60) i))
  FROM generate_series(1, 100000) g;" && psql_s "$S/toast" -c "VACUUM ANALYZE docs"
psql_s "$S/toast" -Atc "SELECT pg_size_pretty(pg_total_relation_size('docs'))"
for mode in lz4 keep lz4 keep; do
  psql_s "$T/postgres" -c "DROP DATABASE IF EXISTS toast" -c "CREATE DATABASE toast"
  dir=$(mktemp -d /tmp/toastm.XXXX)
  start=$(date +%s.%N)
  "$PGTIDE" clone --source "$S/toast" --target "$T/toast" --dir "$dir" --table-jobs 2 --index-jobs 2 --skip-vacuum --toast-compression $mode > "$dir/log" 2>&1
  end=$(date +%s.%N)
  size=$(psql_s "$T/toast" -Atc "SELECT pg_size_pretty(pg_total_relation_size('docs'))")
  echo "$mode: $(echo "$end - $start" | bc) s, target size $size"
done
