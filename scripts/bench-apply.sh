#!/usr/bin/env bash
# The apply side of the benchmark, sourced by scripts/bench.sh (clusters already running,
# PGPASSWORD exported, $PGTIDE built, $WORK a scratch dir). On one source database:
#   burst A: pgbench -t with the TPC-B script (4 changes per transaction),
#   burst B: one transaction updating 500,000 rows,
# each retained by three slots and then drained, one tool at a time, to its own target database:
# pgtide follow, pgcopydb 0.10 follow (wal2json), native logical replication (a subscription).
# A drain is timed from the start of the tool (or ALTER SUBSCRIPTION … ENABLE) until the
# burst's marker row, committed last, is visible on the target. Then a steady pgbench -c 4
# load runs for LOAD_SECONDS while pgtide follows, and a heartbeat row written every 200 ms
# gives the lag samples (target now() - newest heartbeat seen there).

# drain TOOL BURST: starts the tool on the retained burst and times it until the burst's marker
# row is on its target; sets rate[TOOLBURST] (changes/s, or failed / timeout).
drain() {
  local tool=$1 burst=$2
  local S T endpos=${endpos_of[$burst]} changes
  S=$(src_uri applybench); T=$(dst_uri "apply_$tool")
  if [ "$burst" = A ]; then changes=$((16 * BENCH_APPLY_SCALE * 1000))
  else changes=$(( BENCH_APPLY_SCALE * 100000 < 500000 ? BENCH_APPLY_SCALE * 100000 : 500000 )); fi
  local t0 pid=""; t0=$(date +%s.%N)
  case $tool in
    pgtide)
      "$PGTIDE" follow --source "$S" --target "$T" --dir "$WORK/apply-pgtide" --endpos "$endpos" \
        >> "$WORK/apply-pgtide.log" 2>&1 & pid=$!;;
    pgcopydb)
      pgcopydb stream sentinel set endpos --source "$S" "$endpos" >> "$WORK/apply-pgcopydb.log" 2>&1
      pgcopydb stream sentinel set apply --source "$S" >> "$WORK/apply-pgcopydb.log" 2>&1
      pgcopydb follow --source "$S" --target "$T" --dir "$WORK/apply-pgcopydb" --resume --not-consistent \
        --slot-name bench_pgcopydb --origin bench_pgcopydb --endpos "$endpos" \
        >> "$WORK/apply-pgcopydb.log" 2>&1 & pid=$!;;
    native)
      pgtide_psql target apply_native -c "ALTER SUBSCRIPTION bench_native ENABLE" >/dev/null;;
  esac
  local deadline=$(( $(date +%s) + ${PGTIDE_BENCH_APPLY_TIMEOUT:-180} ))
  local seen="SELECT count(*) FROM bench_marker WHERE burst = '$burst'"
  until [ "$(pgtide_psql target "apply_$tool" -At -c "$seen")" = 1 ]; do
    if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null && [ "$(pgtide_psql target "apply_$tool" -At -c "$seen")" != 1 ]; then
      echo "$tool stopped before burst $burst was applied; see $WORK/apply-$tool.log" >&2; tail -5 "$WORK/apply-$tool.log" >&2
      [ "$tool" = pgtide ] && exit 1
      rate[$tool$burst]=failed; return
    fi
    if [ "$(date +%s)" -gt "$deadline" ]; then
      echo "$tool did not drain burst $burst in ${PGTIDE_BENCH_APPLY_TIMEOUT:-180} s; see $WORK/apply-$tool.log" >&2
      [ "$tool" = pgtide ] && exit 1
      rate[$tool$burst]="stalled"; [ -n "$pid" ] && kill "$pid"; return
    fi
    sleep 0.05
  done
  local t1 secs; t1=$(date +%s.%N); secs=$(echo "$t1 - $t0" | bc)
  rate[$tool$burst]=$(echo "$changes / $secs" | bc)
  printf '   %-9s burst %s: %7d changes in %6.1f s = %7d changes/s\n' "$tool" "$burst" "$changes" "$secs" "${rate[$tool$burst]}" >&2
  case $tool in
    native) pgtide_psql target apply_native -c "ALTER SUBSCRIPTION bench_native DISABLE" >/dev/null;;
    pgtide) wait "$pid" || { echo "pgtide follow failed; see $WORK/apply-pgtide.log" >&2; exit 1; };;
    # pgcopydb 0.10 waits for a transaction past endpos on an idle source: stop it.
    pgcopydb) kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true;;
  esac
}

apply_bench() {
  local scale=$1 load_seconds=${2:-30}
  BENCH_APPLY_SCALE=$scale
  # PGTIDE_BENCH_APPLY_TOOLS narrows the comparison (pgtide always runs).
  local TOOLS=${PGTIDE_BENCH_APPLY_TOOLS:-pgcopydb native}
  local S; S=$(src_uri applybench)
  pgtide_psql source postgres -c "DROP DATABASE IF EXISTS applybench WITH (FORCE)" -c "CREATE DATABASE applybench"
  "$PG_BIN/pgbench" -q -i -s "$scale" -h 127.0.0.1 -p "$PGTIDE_SOURCE_PORT" -U postgres applybench >/dev/null 2>&1
  pgtide_psql source applybench -c "ALTER TABLE pgbench_history REPLICA IDENTITY FULL" \
    -c "CREATE TABLE bench_marker (burst text PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())" \
    -c "CREATE TABLE bench_heartbeat (id bigserial PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())" \
    -c "VACUUM ANALYZE" >/dev/null
  "$PG_BIN/pg_dump" -Fc -f "$WORK/applybench.dump" -d "$S"
  for tool in pgtide pgcopydb native; do
    pgtide_psql target postgres -c "DROP DATABASE IF EXISTS apply_$tool WITH (FORCE)" -c "CREATE DATABASE apply_$tool" >/dev/null
    "$PG_BIN/pg_restore" -d "$(dst_uri "apply_$tool")" "$WORK/applybench.dump"
  done
  # The source is quiet: every slot created now starts exactly where the restored copies end.
  "$PGTIDE" stream setup --source "$S" --dir "$WORK/apply-pgtide" --slot-name bench_pgtide >/dev/null
  pgcopydb stream setup --source "$S" --target "$(dst_uri apply_pgcopydb)" --dir "$WORK/apply-pgcopydb" \
    --slot-name bench_pgcopydb --origin bench_pgcopydb > "$WORK/apply-pgcopydb-setup.log" 2>&1
  pgtide_psql source applybench -c "CREATE PUBLICATION bench_native FOR TABLE pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history, bench_marker, bench_heartbeat" >/dev/null
  # The subscription reads its password from a passfile, not from its connection string.
  local passfile="$PGTIDE_CLUSTERS_DIR/bench.pgpass"
  echo "127.0.0.1:$PGTIDE_SOURCE_PORT:*:postgres:$PGTIDE_TEST_PASSWORD" > "$passfile"
  chown postgres "$passfile"; chmod 600 "$passfile"
  pgtide_psql target apply_native -c "CREATE SUBSCRIPTION bench_native CONNECTION 'host=127.0.0.1 port=$PGTIDE_SOURCE_PORT user=postgres dbname=applybench passfile=$passfile' PUBLICATION bench_native WITH (copy_data = false, enabled = false)" >/dev/null

  local -A rate endpos_of
  # pgtide drains last, after both bursts: the marker transaction its follow writes on the
  # source when it waits at endpos (pg_logical_emit_message) makes pgcopydb 0.10's wal2json
  # transform fail ("BUG: logical message xid is 0 …"), so pgcopydb must not meet one.
  for burst in A B; do
    echo "== apply burst $burst" >&2
    if [ $burst = A ]; then
      # One client: with concurrent clients pgcopydb 0.10's transform fails as soon as
      # transactions interleave across a WAL segment switch ("BUG: logical message xid is …
      # different from the current transaction xid"), and its apply then waits forever.
      "$PG_BIN/pgbench" -n -c 1 -t "$((scale * 4000))" -h 127.0.0.1 -p "$PGTIDE_SOURCE_PORT" -U postgres applybench >/dev/null 2>&1
    else
      pgtide_psql source applybench -c "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid <= 500000" >/dev/null
    fi
    pgtide_psql source applybench -c "INSERT INTO bench_marker (burst) VALUES ('$burst')" >/dev/null
    endpos_of[$burst]=$(pgtide_psql source applybench -At -c "SELECT pg_current_wal_insert_lsn()")
    for tool in pgcopydb native; do
      case " $TOOLS " in *" $tool "*) drain "$tool" "$burst";; esac
    done
  done
  for burst in A B; do drain pgtide "$burst"; done
  # pgcopydb keeps its sentinel table on the source, in its own schema.
  printf '[exclude-schema]\npgcopydb\n' > "$WORK/apply-verify.ini"
  for tool in pgtide pgcopydb native; do
    if "$PGTIDE" verify --source "$S" --target "$(dst_uri "apply_$tool")" --filters "$WORK/apply-verify.ini" > "$WORK/apply-$tool.verify" 2>&1; then
      rate[verify_$tool]="identical"
    else
      rate[verify_$tool]="DIFFERS"
      [ $tool = pgtide ] && { echo "pgtide apply: VERIFY FAILED" >&2; tail -20 "$WORK/apply-$tool.verify" >&2; exit 1; }
    fi
  done

  echo "== steady pgbench -c 4 load for ${load_seconds} s while pgtide follows" >&2
  "$PGTIDE" sentinel set endpos none --dir "$WORK/apply-pgtide" >/dev/null
  "$PGTIDE" follow --source "$S" --target "$(dst_uri apply_pgtide)" --dir "$WORK/apply-pgtide" >> "$WORK/apply-pgtide.log" 2>&1 &
  local follower=$!
  sleep 3
  ( end=$(( $(date +%s) + load_seconds )); while [ "$(date +%s)" -lt "$end" ]; do
      pgtide_psql source applybench -c "INSERT INTO bench_heartbeat DEFAULT VALUES" >/dev/null; sleep 0.2; done ) &
  local beat=$!
  "$PG_BIN/pgbench" -n -c 4 -j 2 -T "$load_seconds" -h 127.0.0.1 -p "$PGTIDE_SOURCE_PORT" -U postgres applybench > "$WORK/apply-load.log" 2>&1 &
  local load=$!
  sleep 2
  local samples="$WORK/apply-lag-samples"; : > "$samples"
  while kill -0 "$load" 2>/dev/null; do
    pgtide_psql target apply_pgtide -At -c "SELECT extract(epoch FROM clock_timestamp() - max(at)) FROM bench_heartbeat" >> "$samples"
    sleep 0.25
  done
  wait "$beat" || true
  local tps; tps=$(grep -oE 'tps = [0-9.]+' "$WORK/apply-load.log" | head -1 | cut -d' ' -f3)
  local lag_p50 lag_p95 lag_max
  lag_p50=$(sort -g "$samples" | awk '{a[NR]=$1} END {print a[int(NR*0.50)+1]}')
  lag_p95=$(sort -g "$samples" | awk '{a[NR]=$1} END {i=int(NR*0.95)+1; if (i>NR) i=NR; print a[i]}')
  lag_max=$(sort -g "$samples" | tail -1)
  kill -0 "$follower" 2>/dev/null || { echo "pgtide follow stopped during the steady load; see $WORK/apply-pgtide.log" >&2; exit 1; }
  kill -INT "$follower" 2>/dev/null || true; wait "$follower" 2>/dev/null || true
  if grep -q '^$' "$samples" || [ ! -s "$samples" ]; then
    echo "the lag samples are incomplete (no heartbeat reached the target); see $WORK/apply-pgtide.log" >&2; exit 1
  fi

  echo
  echo "apply: pgbench scale $scale, burst A = $((16 * scale * 1000)) changes from $((4 * scale * 1000)) TPC-B transactions, burst B = one 500,000-row UPDATE"
  printf '%-10s %16s %16s   %s\n' tool "A changes/s" "B rows/s" verify
  for tool in pgtide pgcopydb native; do
    printf '%-10s %16s %16s   %s\n' "$tool" "${rate[${tool}A]}" "${rate[${tool}B]}" "${rate[verify_$tool]}"
  done
  ratio_or_na() { case "$2" in ''|failed|stalled) echo n/a;; *) echo "scale=2; $1 / $2" | bc;; esac; }
  echo "pgtide / pgcopydb:  A $(ratio_or_na "${rate[pgtideA]}" "${rate[pgcopydbA]}")   B $(ratio_or_na "${rate[pgtideB]}" "${rate[pgcopydbB]}")"
  echo "pgtide / native:    A $(ratio_or_na "${rate[pgtideA]}" "${rate[nativeA]}")   B $(ratio_or_na "${rate[pgtideB]}" "${rate[nativeB]}")"
  echo "steady pgbench -c 4 (${tps:-?} tps on the source) while pgtide follows: lag p50 ${lag_p50}s, p95 ${lag_p95}s, max ${lag_max}s ($(wc -l < "$samples") samples)"
  pgtide_psql target apply_native -c "ALTER SUBSCRIPTION bench_native DISABLE" -c "ALTER SUBSCRIPTION bench_native SET (slot_name = NONE)" -c "DROP SUBSCRIPTION bench_native" >/dev/null 2>&1 || true
}
