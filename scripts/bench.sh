#!/usr/bin/env bash
# Benchmark: pgtide clone against pgcopydb clone, pg_dump -Fd | pg_restore, and a physical-limit
# estimate, on the same source data in one run, each result verified by checksum.
#   scripts/bench.sh [SCALE] [JOBS]      (defaults: pgbench scale 50, 2 jobs)
# Prints wall times and the ratios pgtide/pgcopydb, pgtide/dump-restore, pgtide/limit.
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${1:-50}
JOBS=${2:-2}
SPLIT=${PGTIDE_BENCH_SPLIT:-100MB}
source scripts/clusters.sh
pgtide_install_deps
command -v bc >/dev/null || apt-get install -y -qq bc >&2
cargo build --release --quiet
PGTIDE=$PWD/target/release/pgtide
export PGTIDE_CLUSTER_TUNING=bench
trap pgtide_stop_clusters EXIT
pgtide_start_clusters
export PGPASSWORD=$PGTIDE_TEST_PASSWORD      # every tool gets it from the environment, not argv
src_uri() { echo "postgres://postgres@127.0.0.1:$PGTIDE_SOURCE_PORT/$1"; }
dst_uri() { echo "postgres://postgres@127.0.0.1:$PGTIDE_TARGET_PORT/$1"; }
WORK=$(mktemp -d /tmp/pgtide-bench.XXXXXX)

echo "== source: pgbench scale $SCALE + hard cases" >&2
pgtide_psql source postgres -c "CREATE DATABASE bench"
"$PG_BIN/pgbench" -q -i -s "$SCALE" -h 127.0.0.1 -p "$PGTIDE_SOURCE_PORT" -U postgres bench >/dev/null 2>&1
pgtide_psql source bench -f tests/fixtures/hard_cases.sql >/dev/null
pgtide_psql source bench -c "VACUUM ANALYZE" -c "CHECKPOINT"
pgtide_psql source bench -At -c "SELECT 'source size: ' || pg_size_pretty(pg_database_size('bench'))" >&2

declare -A SECONDS_OF
run() { # name command…
  local name=$1; shift
  pgtide_psql target postgres -c "DROP DATABASE IF EXISTS $name WITH (FORCE)" -c "CREATE DATABASE $name"
  pgtide_psql target postgres -c "CHECKPOINT"
  echo "== $name" >&2
  local t0 t1
  t0=$(date +%s.%N)
  "$@" > "$WORK/$name.log" 2>&1 || { echo "$name failed; see $WORK/$name.log" >&2; tail -20 "$WORK/$name.log" >&2; exit 1; }
  t1=$(date +%s.%N)
  SECONDS_OF[$name]=$(echo "$t1 - $t0" | bc)
  echo "   $name: ${SECONDS_OF[$name]} s" >&2
  "$PGTIDE" verify --source "$(src_uri bench)" --target "$(dst_uri "$name")" > "$WORK/$name.verify" 2>&1 \
    || { echo "$name: VERIFY FAILED" >&2; tail -30 "$WORK/$name.verify" >&2; exit 1; }
  echo "   $name: verified identical" >&2
}

run pgtide "$PGTIDE" clone --source "$(src_uri bench)" --target "$(dst_uri pgtide)" --dir "$WORK/pgtide-dir" \
  --table-jobs "$JOBS" --index-jobs "$JOBS" --split-tables-larger-than "$SPLIT"
run pgcopydb pgcopydb clone --source "$(src_uri bench)" --target "$(dst_uri pgcopydb)" --dir "$WORK/pgcopydb-dir" \
  --table-jobs "$JOBS" --index-jobs "$JOBS"
run pgcopydb_split pgcopydb clone --source "$(src_uri bench)" --target "$(dst_uri pgcopydb_split)" --dir "$WORK/pgcopydb-split-dir" \
  --table-jobs "$JOBS" --index-jobs "$JOBS" --split-tables-larger-than "$SPLIT"
dump_restore() {
  "$PG_BIN/pg_dump" -Fd -j "$JOBS" -f "$WORK/dump" -d "$(src_uri bench)"
  "$PG_BIN/pg_restore" -j "$JOBS" -d "$(dst_uri dump_restore)" "$WORK/dump"
  rm -rf "$WORK/dump"
}
run dump_restore dump_restore

# Physical limit: read every table out, load it into index-less tables, build the indexes.
limit() {
  local tables
  tables=$(pgtide_psql source bench -At -c "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r' AND n.nspname IN ('public', 'sales')")
  "$PG_BIN/pg_dump" --section=pre-data -d "$(src_uri bench)" | pgtide_psql target limit >/dev/null
  local t0 t1 t2
  t0=$(date +%s.%N)
  for t in $tables; do pgtide_psql source bench -c "\\copy $t TO '$WORK/$(echo "$t" | tr -d '"').copy'" & done; wait
  t1=$(date +%s.%N)
  for t in $tables; do pgtide_psql target limit -c "\\copy $t FROM '$WORK/$(echo "$t" | tr -d '"').copy'" & done; wait
  t2=$(date +%s.%N)
  "$PG_BIN/pg_dump" --section=post-data -d "$(src_uri bench)" | pgtide_psql target limit >/dev/null
  echo "limit: read $(echo "$t1 - $t0" | bc) s, load $(echo "$t2 - $t1" | bc) s, post-data $(echo "$(date +%s.%N) - $t2" | bc) s" >&2
  rm -f "$WORK"/*.copy
}
run limit limit

best_pgcopydb=$(echo "if (${SECONDS_OF[pgcopydb]} < ${SECONDS_OF[pgcopydb_split]}) ${SECONDS_OF[pgcopydb]} else ${SECONDS_OF[pgcopydb_split]}" | bc)
ratio() { echo "scale=2; $1 / $2" | bc; }
echo
echo "pgbench scale $SCALE, $JOBS jobs, split at $SPLIT, $(nproc) cores"
printf '%-28s %8s s\n' "pgtide clone" "${SECONDS_OF[pgtide]}" "pgcopydb clone" "${SECONDS_OF[pgcopydb]}" \
  "pgcopydb clone --split" "${SECONDS_OF[pgcopydb_split]}" "pg_dump -Fd | pg_restore" "${SECONDS_OF[dump_restore]}" \
  "physical limit" "${SECONDS_OF[limit]}"
echo "pgtide / best pgcopydb:      $(ratio "${SECONDS_OF[pgtide]}" "$best_pgcopydb")"
echo "pgtide / dump-restore:       $(ratio "${SECONDS_OF[pgtide]}" "${SECONDS_OF[dump_restore]}")"
echo "pgtide / physical limit:     $(ratio "${SECONDS_OF[pgtide]}" "${SECONDS_OF[limit]}")"
echo "step times of the pgtide run:"; sed -n '/^step/,/^$/p' "$WORK/pgtide.log"
echo "logs: $WORK"
