#!/usr/bin/env bash
# The demo: two throwaway clusters, a sample database (pgbench + the hard cases), then a live
# migration: pgtide clone --follow while the application (pgbench, as role demo_app) writes,
# `pgtide status` while it runs, then `pgtide cutover --fence` under that traffic (the app role made
# read-only, endpos, catch up, sequences, verify, the downtime window), cleanup. The clusters stay up so you can look around; `scripts/demo.sh stop` ends them.
#   scripts/demo.sh [SCALE]     (pgbench scale, default 10)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/clusters.sh
STATE=/tmp/pgtide-demo.env
if [ "${1:-}" = stop ]; then
  [ -f "$STATE" ] && source "$STATE" && pgtide_stop_clusters && rm -f "$STATE" && echo "demo clusters stopped"
  exit 0
fi
SCALE=${1:-10}
if [ -f "$STATE" ]; then source "$STATE"; pgtide_stop_clusters; rm -f "$STATE"; fi
pgtide_install_deps
cargo build --release --quiet
PGTIDE=$PWD/target/release/pgtide
pgtide_start_clusters
declare -p PGTIDE_CLUSTERS_DIR PGTIDE_SOURCE_PORT PGTIDE_TARGET_PORT PGTIDE_TEST_PASSWORD > "$STATE"
export PGPASSWORD=$PGTIDE_TEST_PASSWORD
export PGTIDE_SOURCE_PGURI="postgres://postgres@127.0.0.1:$PGTIDE_SOURCE_PORT/demo"
export PGTIDE_TARGET_PGURI="postgres://postgres@127.0.0.1:$PGTIDE_TARGET_PORT/demo"
export PGTIDE_DIR="$PGTIDE_CLUSTERS_DIR/work"

echo "== loading the source: pgbench scale $SCALE and the hard cases (tests/fixtures/hard_cases.sql)"
pgtide_psql source postgres -c "CREATE DATABASE demo"
pgtide_psql target postgres -c "CREATE DATABASE demo"
"$PG_BIN/pgbench" -q -i -s "$SCALE" -h 127.0.0.1 -p "$PGTIDE_SOURCE_PORT" -U postgres demo 2>&1 | tail -1
pgtide_psql source demo -f tests/fixtures/hard_cases.sql >/dev/null

echo "== pgtide clone --follow, with pgbench traffic on the source"
# The hard-case tables without a primary key get a replica identity (pgtide refuses to
# publish them otherwise: their updates would fail on the source).
pgtide_psql source demo -c "ALTER TABLE no_pk REPLICA IDENTITY FULL" -c "ALTER TABLE slots REPLICA IDENTITY FULL" \
  -c "ALTER TABLE pgbench_history REPLICA IDENTITY FULL" >/dev/null
# The application's role exists on both servers (roles are not in a database dump: operators
# create them first, e.g. with pg_dumpall --roles-only).
pgtide_psql target postgres -c "CREATE ROLE demo_app LOGIN PASSWORD '$PGTIDE_TEST_PASSWORD'" >/dev/null
pgtide_psql source demo -c "CREATE ROLE demo_app LOGIN PASSWORD '$PGTIDE_TEST_PASSWORD'" \
  -c "GRANT ALL ON ALL TABLES IN SCHEMA public TO demo_app" >/dev/null
"$PGTIDE" clone --follow --table-jobs 2 --index-jobs 2 --split-tables-larger-than 50MB --slot-name demo &
follow_pid=$!
# The application: pgbench as demo_app, until the cutover's fence ends its sessions.
"$PG_BIN/pgbench" -n -c 2 -j 2 -T 600 -h 127.0.0.1 -p "$PGTIDE_SOURCE_PORT" -U demo_app demo > "$PGTIDE_CLUSTERS_DIR/app.log" 2>&1 &
app_pid=$!
for _ in 1 2 3; do
  sleep 10
  echo "== pgtide status (while the clone and the application run)"
  "$PGTIDE" status
done
until [ "$("$PGTIDE" sentinel get | grep -c '"apply": true')" = 1 ]; do
  kill -0 "$follow_pid" 2>/dev/null || { kill "$app_pid"; echo "clone --follow failed (see above)"; exit 1; }
  sleep 1
done
echo "== pgtide cutover --fence (the application is still writing)"
"$PGTIDE" cutover --fence --timeout 5m
wait "$follow_pid"
echo "== pgtide status --json (after the cutover)"
"$PGTIDE" status --json
wait "$app_pid" || echo "the application's sessions were ended by the fence: $(grep -m1 -o 'FATAL.*\|terminating.*' "$PGTIDE_CLUSTERS_DIR/app.log" || true)"
echo "== pgtide cleanup (the fence stays: the application now writes to the target)"
"$PGTIDE" cleanup

cat <<EOT

Done. The clusters are still running:
  source: psql -h $PGTIDE_CLUSTERS_DIR -p $PGTIDE_SOURCE_PORT -U postgres demo
  target: psql -h $PGTIDE_CLUSTERS_DIR -p $PGTIDE_TARGET_PORT -U postgres demo
  state:  sqlite3 $PGTIDE_DIR/state.db 'SELECT * FROM steps'   (progress rows of every step)
  logs:   $PGTIDE_CLUSTERS_DIR/source.log, $PGTIDE_CLUSTERS_DIR/target.log
Stop them with: scripts/demo.sh stop
EOT
