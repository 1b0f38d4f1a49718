#!/usr/bin/env bash
# On demand: where the CPU goes while a retained burst is drained, pgtide against a native
# subscription, on a PG15 pair started here (both servers and both tools share this machine's
# cores, so a drain is as fast as the sum of its processes allows). Prints each drain's rate
# and the CPU seconds every process used during it (walsender, apply worker or pgtide, the
# target backend, …), from /proc/<pid>/stat.
#   scripts/bench-cpu.sh                 burst C: pgbench -c CLIENTS (4) -t TXNS (40000) TPC-B
#   BURST=B scripts/bench-cpu.sh         burst B: one 500,000-row UPDATE
#   BURST=S scripts/bench-cpu.sh         burst S: pgbench -b simple-update (accounts and history
#                                        only: no hot branch or teller rows)
#   BURST=H scripts/bench-cpu.sh         burst H: transactions of 10 inserts into pgbench_history
#                                        (append-only, no index: the target's insert path is the work)
#   BURST=I scripts/bench-cpu.sh         burst I: transactions of 5 inserts into a table with 7
#                                        indexes (the target's index maintenance is the work)
#   LIVE=1 BURST=B scripts/bench-cpu.sh  the 500,000-row UPDATE while each consumer follows live
#                                        (one after the other): prints the time from the UPDATE's
#                                        commit to its last row applied on the target, and the
#                                        source's spill to disk for it (pg_stat_replication_slots)
#   LIVE=1 BURST=W scripts/bench-cpu.sh  the same, live, for one transaction inserting BIG_ROWS (6,000)
#                                        rows of 128 kB into bench_big (incompressible): also prints
#                                        pgtide's peak RSS (VmHWM) while it applies it
#   APPLY_JOBS="1 4" scripts/bench-cpu.sh   pgtide drains the same burst once per value, with
#                                        --apply-jobs N, each with its own slot and target (default 1)
# NATIVE=0 skips the native subscription's live run; WRAP="heaptrack -o FILE" runs pgtide's live
# follow under that command (a profiler).
# Settings: SCALE (pgbench scale, 10), CLIENTS, TXNS; DECODING_MEM (the source's
# logical_decoding_work_mem for every drain, e.g. 2GB: shows what spilling costs the walsender); PERF=1 also records pgtide with
# `perf record -g` into $WORK/perf.data (per-thread report: perf report --sort tid).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/clusters.sh
pgtide_install_deps
cargo build --release --quiet
PGTIDE=$PWD/target/release/pgtide
export PGTIDE_CLUSTER_TUNING=bench
trap pgtide_stop_clusters EXIT
pgtide_start_clusters
export PGPASSWORD=$PGTIDE_TEST_PASSWORD      # from the environment, never argv
WORK=$(mktemp -d /tmp/pgtide-bench-cpu.XXXXXX)
src_uri() { echo "postgres://postgres@127.0.0.1:$PGTIDE_SOURCE_PORT/$1"; }
dst_uri() { echo "postgres://postgres@127.0.0.1:$PGTIDE_TARGET_PORT/$1"; }
SCALE=${SCALE:-10}; TXNS=${TXNS:-40000}; CLIENTS=${CLIENTS:-4}; BURST=${BURST:-C}
APPLY_JOBS=${APPLY_JOBS:-1}

pgtide_psql source postgres -c "CREATE DATABASE cpubench" >/dev/null
if [ -n "${DECODING_MEM:-}" ]; then
  pgtide_psql source postgres -c "ALTER SYSTEM SET logical_decoding_work_mem = '$DECODING_MEM'" -c "SELECT pg_reload_conf()" >/dev/null
fi
"$PG_BIN/pgbench" -q -i -s "$SCALE" -h 127.0.0.1 -p "$PGTIDE_SOURCE_PORT" -U postgres cpubench >/dev/null 2>&1
pgtide_psql source cpubench -c "ALTER TABLE pgbench_history REPLICA IDENTITY FULL" \
  -c "CREATE TABLE bench_marker (burst text PRIMARY KEY)" \
  -c "CREATE TABLE bench_big (id int PRIMARY KEY, body bytea)" \
  -c "CREATE TABLE bench_indexed (id bigserial PRIMARY KEY, k bigint, a int, b int, c text, d text, e timestamptz)" \
  -c "CREATE INDEX ON bench_indexed (k)" -c "CREATE INDEX ON bench_indexed (a, b)" -c "CREATE INDEX ON bench_indexed (b)" \
  -c "CREATE INDEX ON bench_indexed (c)" -c "CREATE INDEX ON bench_indexed (d)" -c "CREATE INDEX ON bench_indexed (e)" \
  -c "VACUUM ANALYZE" >/dev/null
"$PG_BIN/pg_dump" -Fc -f "$WORK/cpubench.dump" -d "$(src_uri cpubench)"
for db in native $(for j in $APPLY_JOBS; do echo "pgtide_$j"; done); do
  pgtide_psql target postgres -c "CREATE DATABASE cpu_$db" >/dev/null
  "$PG_BIN/pg_restore" -d "$(dst_uri "cpu_$db")" "$WORK/cpubench.dump"
done
# Every slot is created on a quiet source: each starts where the restored copies end.
for j in $APPLY_JOBS; do
  "$PGTIDE" stream setup --source "$(src_uri cpubench)" --dir "$WORK/pgtide_$j" --slot-name "cpu_pgtide_$j" --no-ddl-capture >/dev/null 2>&1
done
pgtide_psql source cpubench -c "CREATE PUBLICATION cpu_native FOR TABLE pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history, bench_marker, bench_indexed, bench_big" >/dev/null
passfile="$PGTIDE_CLUSTERS_DIR/cpu.pgpass"
echo "127.0.0.1:$PGTIDE_SOURCE_PORT:*:postgres:$PGTIDE_TEST_PASSWORD" > "$passfile"
chown postgres "$passfile"; chmod 600 "$passfile"
pgtide_psql target cpu_native -c "CREATE SUBSCRIPTION cpu_native CONNECTION 'host=127.0.0.1 port=$PGTIDE_SOURCE_PORT user=postgres dbname=cpubench passfile=$passfile' PUBLICATION cpu_native WITH (copy_data = false, enabled = false)" >/dev/null

# CPU ticks (user + system) of every PostgreSQL and pgtide process: "ticks pid command".
cpu_ticks() {
  local d cmd
  for d in /proc/[0-9]*; do
    cmd=$( { tr '\0' ' ' < "$d/cmdline"; } 2>/dev/null) || continue
    case "$cmd" in
      *postgres:*|*pgtide*) awk -v pid="${d#/proc/}" -v cmd="$cmd" '{print $14 + $15, pid, cmd}' "$d/stat" 2>/dev/null || true;;
    esac
  done
}

# cpu_used: the CPU seconds each process used between the cpu0 and cpu1 snapshots, most first.
cpu_used() {
  local hz; hz=$(getconf CLK_TCK)
  awk -v hz="$hz" 'NR == FNR {before[$2] = $1; next}
       {used = ($1 - before[$2]) / hz; if (used > 0.05) {$1 = ""; $2 = ""; printf "   %6.2f s %s\n", used, substr($0, 3)}}' \
    "$WORK/cpu0" "$WORK/cpu1" | sort -rn | head -6
}

# live NAME DB SLOT [PID]: the burst (B: the 500,000-row UPDATE; W: BIG_ROWS x 128 kB inserted in one
# transaction) while the consumer follows; the time from its commit to the marker written after
# it being on DB, what its slot spilled to the source's disk, and PID's peak RSS when given.
BIG_ROWS=${BIG_ROWS:-6000}
live() {
  local name=$1 db=$2 slot=$3 pid=${4:-} t0 t1 spilled0 spilled1 marker=$RANDOM$RANDOM what
  until [ "$(pgtide_psql target "$db" -At -c "SELECT count(*) FROM bench_marker WHERE burst = 'ready_$slot'")" = 1 ]; do sleep 0.05; done
  spilled0=$(pgtide_psql source cpubench -At -c "SELECT coalesce(sum(spill_bytes), 0) FROM pg_stat_replication_slots WHERE slot_name = '$slot'")
  if [ "$BURST" = W ]; then
    what="$BIG_ROWS x 128 kB transaction"
    pgtide_psql source cpubench -c "TRUNCATE bench_big" >/dev/null
    pgtide_psql source cpubench -c "INSERT INTO bench_big (id, body) SELECT g, int4send(g) || b.block FROM (SELECT string_agg(decode(md5(i::text || random()::text), 'hex'), ''::bytea) AS block FROM generate_series(1, 8192) i) b, generate_series(1, $BIG_ROWS) g" >/dev/null
  else
    what="500,000-row UPDATE"
    pgtide_psql source cpubench -c "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid <= 500000" >/dev/null
  fi
  t0=$(date +%s.%N); cpu_ticks > "$WORK/cpu0"
  echo "$name: the $what committed at $(date -u +%T.%N)"
  pgtide_psql source cpubench -c "INSERT INTO bench_marker VALUES ('$marker')" >/dev/null
  until [ "$(pgtide_psql target "$db" -At -c "SELECT count(*) FROM bench_marker WHERE burst = '$marker'")" = 1 ]; do sleep 0.02; done
  t1=$(date +%s.%N); cpu_ticks > "$WORK/cpu1"
  spilled1=$(pgtide_psql source cpubench -At -c "SELECT coalesce(sum(spill_bytes), 0) FROM pg_stat_replication_slots WHERE slot_name = '$slot'")
  printf '%s: the %s applied %.2f s after its commit; the source spilled %d MB for it\n' "$name" "$what" \
    "$(echo "$t1 - $t0" | bc)" "$(( (spilled1 - spilled0) >> 20 ))"
  echo "   CPU seconds used from the commit until then:"
  cpu_used
  if [ -n "$pid" ]; then
    awk -v name="$name" '/^VmHWM:/ {printf "%s: peak RSS (VmHWM) %.0f MB\n", name, $2 / 1024}' "/proc/$pid/status"
  fi
}

if [ -n "${LIVE:-}" ]; then
  case $BURST in B|W) ;; *) echo "LIVE=1 measures burst B or W only" >&2; exit 2;; esac
  if [ "${NATIVE:-1}" != 0 ]; then
    pgtide_psql source cpubench -c "INSERT INTO bench_marker VALUES ('ready_cpu_native')" >/dev/null
    pgtide_psql target cpu_native -c "ALTER SUBSCRIPTION cpu_native ENABLE" >/dev/null
    live native cpu_native cpu_native
    pgtide_psql target cpu_native -c "ALTER SUBSCRIPTION cpu_native DISABLE" >/dev/null
  fi
  for j in $APPLY_JOBS; do
    pgtide_psql source cpubench -c "INSERT INTO bench_marker VALUES ('ready_cpu_pgtide_$j')" >/dev/null
    # shellcheck disable=SC2086  # WRAP: a profiler's command line, e.g. "heaptrack -o $WORK/heap"
    PGTIDE_LOG=${PGTIDE_LOG:-info} ${WRAP:-} "$PGTIDE" follow --source "$(src_uri cpubench)" --target "$(dst_uri "cpu_pgtide_$j")" --dir "$WORK/pgtide_$j" \
      --apply-jobs "$j" > "$WORK/pgtide_$j.log" 2>&1 &
    follower=$!
    live "pgtide --apply-jobs $j" "cpu_pgtide_$j" "cpu_pgtide_$j" "$follower"
    kill -INT "$follower"; pkill -INT -x pgtide || true; wait "$follower" || true
  done
  pgtide_psql target cpu_native -c "ALTER SUBSCRIPTION cpu_native SET (slot_name = NONE)" -c "DROP SUBSCRIPTION cpu_native" >/dev/null 2>&1 || true
  echo "logs: $WORK"
  exit 0
fi

if [ "$BURST" = B ]; then
  pgtide_psql source cpubench -c "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid <= 500000" >/dev/null
  changes=500000
elif [ "$BURST" = I ]; then
  cat > "$WORK/inserts.sql" <<'SQL'
BEGIN;
INSERT INTO bench_indexed (k, a, b, c, d, e) SELECT (random() * 1e12)::bigint, (random() * 1e6)::int, (random() * 1e3)::int, md5(random()::text), md5(random()::text), now() - random() * interval '1 year' FROM generate_series(1, 5);
END;
SQL
  chmod 644 "$WORK/inserts.sql"
  "$PG_BIN/pgbench" -n -f "$WORK/inserts.sql" -c "$CLIENTS" -j 2 -t "$TXNS" -h 127.0.0.1 -p "$PGTIDE_SOURCE_PORT" -U postgres cpubench >/dev/null 2>&1
  changes=$((CLIENTS * TXNS * 5))
elif [ "$BURST" = H ]; then
  cat > "$WORK/history.sql" <<'SQL'
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) SELECT (random() * 100)::int, (random() * 10)::int, (random() * 1e6)::int, (random() * 1e4)::int, now() FROM generate_series(1, 10);
SQL
  chmod 644 "$WORK/history.sql"
  "$PG_BIN/pgbench" -n -f "$WORK/history.sql" -c "$CLIENTS" -j 2 -t "$TXNS" -h 127.0.0.1 -p "$PGTIDE_SOURCE_PORT" -U postgres cpubench >/dev/null 2>&1
  changes=$((CLIENTS * TXNS * 10))
elif [ "$BURST" = S ]; then
  "$PG_BIN/pgbench" -n -b simple-update -c "$CLIENTS" -j 2 -t "$TXNS" -h 127.0.0.1 -p "$PGTIDE_SOURCE_PORT" -U postgres cpubench >/dev/null 2>&1
  changes=$((CLIENTS * TXNS * 2))
else
  "$PG_BIN/pgbench" -n -c "$CLIENTS" -j 2 -t "$TXNS" -h 127.0.0.1 -p "$PGTIDE_SOURCE_PORT" -U postgres cpubench >/dev/null 2>&1
  changes=$((CLIENTS * TXNS * 4))
fi
pgtide_psql source cpubench -c "INSERT INTO bench_marker VALUES ('end')" >/dev/null
endpos=$(pgtide_psql source cpubench -At -c "SELECT pg_current_wal_insert_lsn()")

# drain NAME DB: waits until the burst's marker is on DB; prints the rate and the CPU used.
drain() {
  local name=$1 db=$2 t0 t1
  cpu_ticks > "$WORK/cpu0"; t0=$(date +%s.%N)
  until [ "$(pgtide_psql target "$db" -At -c "SELECT count(*) FROM bench_marker")" = 1 ]; do sleep 0.05; done
  t1=$(date +%s.%N); cpu_ticks > "$WORK/cpu1"
  printf '%s: %d changes in %.1f s = %d changes/s; CPU seconds used meanwhile:\n' "$name" "$changes" \
    "$(echo "$t1 - $t0" | bc)" "$(echo "$changes / ($t1 - $t0)" | bc)"
  cpu_used
}

pgtide_psql target cpu_native -c "ALTER SUBSCRIPTION cpu_native ENABLE" >/dev/null
drain native cpu_native
pgtide_psql target cpu_native -c "ALTER SUBSCRIPTION cpu_native DISABLE" >/dev/null
for j in $APPLY_JOBS; do
  "$PGTIDE" follow --source "$(src_uri cpubench)" --target "$(dst_uri "cpu_pgtide_$j")" --dir "$WORK/pgtide_$j" \
    --endpos "$endpos" --apply-jobs "$j" > "$WORK/pgtide_$j.log" 2>&1 &
  follower=$!
  if [ -n "${PERF:-}" ]; then
    perf record -F 1999 -g -o "$WORK/perf_$j.data" -p "$follower" >/dev/null 2>&1 &
  fi
  drain "pgtide --apply-jobs $j" "cpu_pgtide_$j"
  wait "$follower" || { echo "pgtide follow failed; see $WORK/pgtide_$j.log" >&2; exit 1; }
done
pgtide_psql target cpu_native -c "ALTER SUBSCRIPTION cpu_native SET (slot_name = NONE)" -c "DROP SUBSCRIPTION cpu_native" >/dev/null 2>&1 || true
echo "logs: $WORK"
