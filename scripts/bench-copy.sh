#!/usr/bin/env bash
# On demand: the target-side cost of the ways apply can write a run of 5,000 rows, 500,000 rows
# in all, on one PostgreSQL 15 cluster started here (pgbench scale 10): UPDATE … FROM unnest of
# text[] parameters (pgtide's path), COPY text / binary into a temp table then UPDATE … FROM,
# and for inserts unnest against COPY straight into the table (scripts/bench_copy.py, with
# psycopg from PyPI). Each variant in a rolled-back transaction, best of three.
#   scripts/bench-copy.sh [--inserts]     (--inserts: the insert variants only)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/clusters.sh
pgtide_install_deps
python3 -c "import psycopg" 2>/dev/null || pip install --quiet "psycopg[binary]"
export PGTIDE_CLUSTER_TUNING=bench
trap pgtide_stop_clusters EXIT
pgtide_start_clusters
export PGPASSWORD=$PGTIDE_TEST_PASSWORD      # from the environment, never argv
pgtide_psql target postgres -c "CREATE DATABASE copybench" >/dev/null
"$PG_BIN/pgbench" -q -i -s 10 -h 127.0.0.1 -p "$PGTIDE_TARGET_PORT" -U postgres copybench >/dev/null 2>&1
python3 scripts/bench_copy.py "$@" "postgresql://postgres@127.0.0.1:$PGTIDE_TARGET_PORT/copybench"
