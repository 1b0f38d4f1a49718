#!/usr/bin/env bash
# The apply side of the benchmark, sourced by scripts/bench.sh (clusters already running,
# PGPASSWORD exported, $PGTIDE built, $WORK a scratch dir). On one source database (pgbench
# scale SCALE, plus bench_full, a REPLICA IDENTITY FULL table of SCALE x 10,000 rows with a
# UNIQUE index on id and no primary key, and bench_big, empty, for the steady phase):
#   burst A: pgbench -c 1 -t SCALE x 4,000 with the TPC-B script (4 changes per transaction),
#   burst F: SCALE x 1,000 changes to bench_full (5 UPDATEs + 5 DELETEs per transaction, ids
#            spread over the whole table) by 2 concurrent psql clients,
#   burst B: one transaction updating 500,000 rows (SCALE x 100,000 below scale 5),
#   burst C: pgbench -c 4 -j 2 -t SCALE x 1,000 (as many TPC-B transactions as burst A, from 4
#            interleaving clients),
# generated in that order, each retained by three slots and drained, one tool at a time, to its
# own target database: pgtide follow, pgcopydb 0.10 follow (wal2json), native logical
# replication (a subscription). pgcopydb does not drain burst C (0.10 cannot apply interleaved
# transactions, see below), nor any burst after one it failed or stalled on; only pgtide's
# failure or stall aborts the run (another tool's is reported: failed, stalled, not run).
# A drain is timed from the start of the tool (or ALTER SUBSCRIPTION … ENABLE) until the
# burst's marker row, committed last, is visible on the target, capped by
# PGTIDE_BENCH_APPLY_TIMEOUT (180 s); a tool stalled on burst F is credited with the changes it
# applied by then (a lower bound for the ratio). pgtide drains every burst last, and its lines
# also show when its apply started (the "apply: resuming after" log line) and its rate from
# then (a follow start once took up to a minute before applying anything: the spool's resume
# query, fixed; now under 1 s).
# The target is PostgreSQL 15: native apply finds a FULL-identity row by a sequential scan,
# pgtide by the unique index. Then pgtide follows alone; once it has applied a marker, a
# steady pgbench -c 4 load runs for LOAD_SECONDS: a heartbeat row written every 200 ms gives
# the lag samples (target now() - newest heartbeat seen there), taken every 0.25 s with pgtide
# follow's RSS (VmRSS); after the load, one transaction inserts BIG_ROWS
# (PGTIDE_BENCH_BIG_ROWS, default 6,000) rows of 128 kB of random bytes into bench_big, and
# follow is stopped only once that transaction is on the target, so the RSS maximum covers it
# (the lag figures are the steady load's alone; the 750 MB transaction delays what follows it
# by the time it takes to decode, send and apply).
# Summary lines go to $WORK/summary.

# drain TOOL BURST: starts the tool on the retained burst and times it until the burst's marker
# row is on its target; sets rate[TOOLBURST] (changes/s, or failed / stalled).
drain() {
  local tool=$1 burst=$2
  local S T endpos=${endpos_of[$burst]} changes=${changes_of[$burst]}
  S=$(src_uri applybench); T=$(dst_uri "apply_$tool")
  local log_from=0; [ -f "$WORK/apply-$tool.log" ] && log_from=$(wc -l < "$WORK/apply-$tool.log")
  local t0 pid=""; t0=$(date +%s.%N)
  case $tool in
    pgtide)
      "$PGTIDE" follow --source "$S" --target "$T" --dir "$WORK/apply-pgtide" --endpos "$endpos" \
        >> "$WORK/apply-pgtide.log" 2>&1 & pid=$!;;
    pgcopydb)
      if ! { pgcopydb stream sentinel set endpos --source "$S" "$endpos" && pgcopydb stream sentinel set apply --source "$S"; } >> "$WORK/apply-pgcopydb.log" 2>&1; then
        echo "pgcopydb could not set its sentinel for burst $burst; see $WORK/apply-pgcopydb.log" >&2
        rate[$tool$burst]=failed; return 0
      fi
      pgcopydb follow --source "$S" --target "$T" --dir "$WORK/apply-pgcopydb" --resume --not-consistent \
        --slot-name bench_pgcopydb --origin bench_pgcopydb --endpos "$endpos" \
        >> "$WORK/apply-pgcopydb.log" 2>&1 & pid=$!;;
    native)
      pgtide_psql target apply_native -c "ALTER SUBSCRIPTION bench_native ENABLE" >/dev/null;;
  esac
  local deadline=$(( $(date +%s) + ${PGTIDE_BENCH_APPLY_TIMEOUT:-180} ))
  local seen="SELECT count(*) FROM bench_marker WHERE burst = '$burst'"
  local native_t=""
  until [ "$(pgtide_psql target "apply_$tool" -At -c "$seen")" = 1 ]; do
    # When native's apply worker runs (the launcher starts it some time after ENABLE).
    if [ "$tool" = native ] && [ -z "$native_t" ] \
      && [ "$(pgtide_psql target apply_native -At -c "SELECT count(*) > 0 FROM pg_stat_subscription WHERE subname = 'bench_native' AND pid IS NOT NULL")" = t ]; then
      native_t=$(date +%s.%N)
    fi
    if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null && [ "$(pgtide_psql target "apply_$tool" -At -c "$seen")" != 1 ]; then
      echo "$tool stopped before burst $burst was applied; see $WORK/apply-$tool.log" >&2; tail -5 "$WORK/apply-$tool.log" >&2
      [ "$tool" = pgtide ] && exit 1
      wait "$pid" 2>/dev/null || true
      rate[$tool$burst]=failed; return 0
    fi
    if [ "$(date +%s)" -gt "$deadline" ]; then
      echo "$tool did not drain burst $burst in ${PGTIDE_BENCH_APPLY_TIMEOUT:-180} s; see $WORK/apply-$tool.log" >&2
      [ "$tool" = pgtide ] && exit 1
      rate[$tool$burst]="stalled"
      if [ "$burst" = F ]; then
        # Burst F's progress is countable on the target: deleted rows + updated rows (grp moved).
        local done_; done_=$(pgtide_psql target "apply_$tool" -At -c "SELECT $FULL_ROWS - count(*) + count(*) FILTER (WHERE grp <> id % 100) FROM bench_full" || echo 0)
        partial_of[$tool$burst]=$(echo "$done_ / ${PGTIDE_BENCH_APPLY_TIMEOUT:-180}" | bc)
        rate[$tool$burst]="stalled ($done_ of $changes changes in ${PGTIDE_BENCH_APPLY_TIMEOUT:-180} s: ${partial_of[$tool$burst]}/s)"
        echo "   $tool applied $done_ of burst F's $changes changes in ${PGTIDE_BENCH_APPLY_TIMEOUT:-180} s" >&2
      fi
      if [ -n "$pid" ]; then stop_tool "$pid"; fi
      if [ "$tool" = native ]; then pgtide_psql target apply_native -c "ALTER SUBSCRIPTION bench_native DISABLE" >/dev/null; fi
      return 0
    fi
    sleep 0.05
  done
  local t1 secs; t1=$(date +%s.%N); secs=$(echo "$t1 - $t0" | bc)
  rate[$tool$burst]=$(echo "$changes / $secs" | bc)
  local started="" applying_at=""
  if [ "$tool" = pgtide ]; then
    # How long follow took to start applying (its "apply: resuming after" log line).
    local resumed; resumed=$(tail -n +"$((log_from + 1))" "$WORK/apply-pgtide.log" | grep -m1 'apply: resuming after' | cut -d' ' -f1 || true)
    [ -n "$resumed" ] && applying_at=$(date -d "$resumed" +%s.%N)
  elif [ "$tool" = native ]; then
    applying_at=$native_t
  fi
  if [ -n "$applying_at" ]; then
    startup_of[$tool$burst]=$(echo "$applying_at - $t0" | bc)
    applyonly_of[$tool$burst]=$(echo "$changes / ($secs - ${startup_of[$tool$burst]} + 0.001)" | bc)
    started=$(printf ' (apply started after %.1f s; %d changes/s from then)' "${startup_of[$tool$burst]}" "${applyonly_of[$tool$burst]}")
  fi
  printf '   %-9s burst %s: %7d changes in %6.1f s = %7d changes/s%s\n' "$tool" "$burst" "$changes" "$secs" "${rate[$tool$burst]}" "$started" >&2
  case $tool in
    native) pgtide_psql target apply_native -c "ALTER SUBSCRIPTION bench_native DISABLE" >/dev/null;;
    pgtide) wait "$pid" || { echo "pgtide follow failed; see $WORK/apply-pgtide.log" >&2; exit 1; };;
    # pgcopydb 0.10 waits for a transaction past endpos on an idle source: stop it.
    pgcopydb) stop_tool "$pid";;
  esac
}

# stop_tool PID: SIGTERM to a tool this script started and to its children (pgcopydb's workers),
# SIGKILL after 10 s (a stalled pgcopydb apply worker does not stop on SIGTERM), then reap it.
stop_tool() {
  local pid=$1 kids
  kids=$(pgrep -P "$pid" || true)
  # shellcheck disable=SC2086 # $kids: one pid per word
  kill "$pid" $kids 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  # shellcheck disable=SC2086
  kill -KILL "$pid" $kids 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

# burst_F_scripts DIR TRANSACTIONS STRIDE: one psql script per client (2), transaction k (of
# TRANSACTIONS) updating ids k*STRIDE+1..+5 and deleting ids k*STRIDE+6..+10 of bench_full;
# client c runs the transactions k with k % 2 = c.
burst_F_scripts() {
  local dir=$1 txns=$2 stride=$3 c
  for c in 0 1; do
    awk -v c="$c" -v n="$txns" -v s="$stride" 'BEGIN {
      for (k = c; k < n; k += 2) {
        b = k * s + 1
        printf "BEGIN;\nUPDATE bench_full SET grp = grp + 1, payload = md5(payload) WHERE id BETWEEN %d AND %d;\n", b, b + 4
        printf "DELETE FROM bench_full WHERE id BETWEEN %d AND %d;\nCOMMIT;\n", b + 5, b + 9
      } }' > "$dir/burst-F-$c.sql"
  done
}

apply_bench() {
  local scale=$1 load_seconds=${2:-30}
  # PGTIDE_BENCH_APPLY_TOOLS narrows the comparison (pgtide always runs).
  local TOOLS=${PGTIDE_BENCH_APPLY_TOOLS:-pgcopydb native}
  local big_rows=${PGTIDE_BENCH_BIG_ROWS:-6000}
  local full_rows=$((scale * 10000)) full_txns=$((scale * 100))
  local S; S=$(src_uri applybench)
  local -A rate endpos_of changes_of startup_of partial_of applyonly_of
  FULL_ROWS=$full_rows
  changes_of[A]=$((16 * scale * 1000))
  changes_of[B]=$(( scale * 100000 < 500000 ? scale * 100000 : 500000 ))
  changes_of[C]=$((16 * scale * 1000))
  changes_of[F]=$((full_txns * 10))
  pgtide_psql source postgres -c "DROP DATABASE IF EXISTS applybench WITH (FORCE)" -c "CREATE DATABASE applybench"
  "$PG_BIN/pgbench" -q -i -s "$scale" -h 127.0.0.1 -p "$PGTIDE_SOURCE_PORT" -U postgres applybench >/dev/null 2>&1
  pgtide_psql source applybench -c "ALTER TABLE pgbench_history REPLICA IDENTITY FULL" \
    -c "CREATE TABLE bench_marker (burst text PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())" \
    -c "CREATE TABLE bench_heartbeat (id bigserial PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())" \
    -c "CREATE TABLE bench_full (id int NOT NULL, grp int, payload text)" \
    -c "INSERT INTO bench_full SELECT g, g % 100, md5(g::text) FROM generate_series(1, $full_rows) g" \
    -c "CREATE UNIQUE INDEX bench_full_id ON bench_full (id)" \
    -c "ALTER TABLE bench_full REPLICA IDENTITY FULL" \
    -c "CREATE TABLE bench_big (id int PRIMARY KEY, body bytea)" \
    -c "VACUUM ANALYZE" >/dev/null
  "$PG_BIN/pg_dump" -Fc -f "$WORK/applybench.dump" -d "$S"
  for tool in pgtide pgcopydb native; do
    pgtide_psql target postgres -c "DROP DATABASE IF EXISTS apply_$tool WITH (FORCE)" -c "CREATE DATABASE apply_$tool" >/dev/null
    "$PG_BIN/pg_restore" -d "$(dst_uri "apply_$tool")" "$WORK/applybench.dump"
  done
  # The source is quiet: every slot created now starts exactly where the restored copies end.
  # --no-ddl-capture: pgtide's DDL capture turns pgcopydb's own DDL on the source (its sentinel
  # schema and table, created just below) into logical messages, which pgcopydb 0.10's wal2json
  # transform rejects ("BUG: logical message xid is 0 …"); the bursts contain no DDL.
  "$PGTIDE" stream setup --source "$S" --dir "$WORK/apply-pgtide" --slot-name bench_pgtide --no-ddl-capture >/dev/null
  pgcopydb stream setup --source "$S" --target "$(dst_uri apply_pgcopydb)" --dir "$WORK/apply-pgcopydb" \
    --slot-name bench_pgcopydb --origin bench_pgcopydb > "$WORK/apply-pgcopydb-setup.log" 2>&1
  pgtide_psql source applybench -c "CREATE PUBLICATION bench_native FOR TABLE pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history, bench_marker, bench_heartbeat, bench_full, bench_big" >/dev/null
  # The subscription reads its password from a passfile, not from its connection string.
  local passfile="$PGTIDE_CLUSTERS_DIR/bench.pgpass"
  echo "127.0.0.1:$PGTIDE_SOURCE_PORT:*:postgres:$PGTIDE_TEST_PASSWORD" > "$passfile"
  chown postgres "$passfile"; chmod 600 "$passfile"
  pgtide_psql target apply_native -c "CREATE SUBSCRIPTION bench_native CONNECTION 'host=127.0.0.1 port=$PGTIDE_SOURCE_PORT user=postgres dbname=applybench passfile=$passfile' PUBLICATION bench_native WITH (copy_data = false, enabled = false)" >/dev/null

  # pgtide drains last, after every burst: the marker transaction its follow writes on the
  # source when it waits at endpos (pg_logical_emit_message) makes pgcopydb 0.10's wal2json
  # transform fail ("BUG: logical message xid is 0 …"), so pgcopydb must not meet one.
  # Burst C comes last: pgcopydb does not drain it, and it would block pgcopydb's later bursts.
  # F comes before B: pgcopydb 0.10 is slow on B (it often hits the timeout at scale 10), and
  # after a failed or stalled burst its later bursts are not run.
  local pgcopydb_broken="" NA_C="n/a (pgcopydb 0.10 cannot apply interleaved transactions)"
  for burst in A F B C; do
    echo "== apply burst $burst" >&2
    case $burst in
      A)
        # One client: with concurrent clients pgcopydb 0.10's transform fails as soon as
        # transactions interleave across a WAL segment switch ("BUG: logical message xid is …
        # different from the current transaction xid"), and its apply then waits forever.
        "$PG_BIN/pgbench" -n -c 1 -t "$((scale * 4000))" -h 127.0.0.1 -p "$PGTIDE_SOURCE_PORT" -U postgres applybench >/dev/null 2>&1;;
      B)
        pgtide_psql source applybench -c "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid <= 500000" >/dev/null;;
      F)
        burst_F_scripts "$WORK" "$full_txns" $((full_rows / full_txns))
        pgtide_psql source applybench -f "$WORK/burst-F-0.sql" >/dev/null & local f0=$!
        pgtide_psql source applybench -f "$WORK/burst-F-1.sql" >/dev/null & local f1=$!
        wait "$f0"; wait "$f1";;
      C)
        # 4 clients, as many transactions in all as burst A.
        "$PG_BIN/pgbench" -n -c 4 -j 2 -t "$((scale * 1000))" -h 127.0.0.1 -p "$PGTIDE_SOURCE_PORT" -U postgres applybench >/dev/null 2>&1;;
    esac
    pgtide_psql source applybench -c "INSERT INTO bench_marker (burst) VALUES ('$burst')" >/dev/null
    endpos_of[$burst]=$(pgtide_psql source applybench -At -c "SELECT pg_current_wal_insert_lsn()")
    for tool in pgcopydb native; do
      case " $TOOLS " in *" $tool "*) ;; *) rate[$tool$burst]="not run"; continue;; esac
      if [ "$tool" = pgcopydb ] && [ "$burst" = C ]; then
        rate[pgcopydbC]=$NA_C; echo "   pgcopydb  burst C: $NA_C" >&2; continue
      fi
      # A pgcopydb that failed or stalled on an earlier burst left its slot behind that burst.
      if [ "$tool" = pgcopydb ] && [ -n "$pgcopydb_broken" ]; then
        rate[pgcopydb$burst]="not run (failed or stalled on burst $pgcopydb_broken)"
        echo "   pgcopydb  burst $burst: not run (it failed or stalled on burst $pgcopydb_broken)" >&2; continue
      fi
      drain "$tool" "$burst"
      case "$tool:${rate[$tool$burst]}" in pgcopydb:failed|pgcopydb:stalled*) pgcopydb_broken=$burst;; esac
    done
  done
  for burst in A F B C; do drain pgtide "$burst"; done
  # pgcopydb keeps its sentinel table on the source, in its own schema.
  printf '[exclude-schema]\npgcopydb\n' > "$WORK/apply-verify.ini"
  for tool in pgtide pgcopydb native; do
    if "$PGTIDE" verify --source "$S" --target "$(dst_uri "apply_$tool")" --filters "$WORK/apply-verify.ini" > "$WORK/apply-$tool.verify" 2>&1; then
      rate[verify_$tool]="identical"
    else
      rate[verify_$tool]="DIFFERS"
      [ $tool = pgcopydb ] && rate[verify_$tool]="DIFFERS (it did not apply burst C)"
      [ $tool = pgtide ] && { echo "pgtide apply: VERIFY FAILED" >&2; tail -20 "$WORK/apply-$tool.verify" >&2; exit 1; }
    fi
  done

  echo "== steady pgbench -c 4 load for ${load_seconds} s while pgtide follows, then one $big_rows x 128 kB transaction" >&2
  "$PGTIDE" sentinel set endpos none --dir "$WORK/apply-pgtide" >/dev/null
  "$PGTIDE" follow --source "$S" --target "$(dst_uri apply_pgtide)" --dir "$WORK/apply-pgtide" >> "$WORK/apply-pgtide.log" 2>&1 &
  local follower=$!
  # The load starts once follow applies: a marker committed now must reach the target first.
  local t_follow; t_follow=$(date +%s.%N)
  pgtide_psql source applybench -c "INSERT INTO bench_marker (burst) VALUES ('steady')" >/dev/null
  local ready_deadline=$(( $(date +%s) + ${PGTIDE_BENCH_APPLY_TIMEOUT:-180} ))
  until [ "$(pgtide_psql target apply_pgtide -At -c "SELECT count(*) FROM bench_marker WHERE burst = 'steady'")" = 1 ]; do
    kill -0 "$follower" 2>/dev/null || { echo "pgtide follow stopped before the steady load; see $WORK/apply-pgtide.log" >&2; exit 1; }
    [ "$(date +%s)" -le "$ready_deadline" ] || { echo "pgtide follow applied nothing in ${PGTIDE_BENCH_APPLY_TIMEOUT:-180} s; see $WORK/apply-pgtide.log" >&2; exit 1; }
    sleep 0.1
  done
  local follow_ready; follow_ready=$(echo "$(date +%s.%N) - $t_follow" | bc)
  printf '   pgtide follow applied a first transaction after %.1f s; starting the load\n' "$follow_ready" >&2
  ( end=$(( $(date +%s) + load_seconds )); while [ "$(date +%s)" -lt "$end" ]; do
      pgtide_psql source applybench -c "INSERT INTO bench_heartbeat DEFAULT VALUES" >/dev/null; sleep 0.2; done ) &
  local beat=$!
  "$PG_BIN/pgbench" -n -c 4 -j 2 -T "$load_seconds" -h 127.0.0.1 -p "$PGTIDE_SOURCE_PORT" -U postgres applybench > "$WORK/apply-load.log" 2>&1 &
  local load=$!
  # Sampling starts with the first heartbeat on the target (before it, the lag is undefined).
  local beat_deadline=$(( $(date +%s) + 30 ))
  until [ "$(pgtide_psql target apply_pgtide -At -c "SELECT count(*) > 0 FROM bench_heartbeat")" = t ]; do
    [ "$(date +%s)" -le "$beat_deadline" ] || { echo "no heartbeat reached the pgtide target in 30 s; see $WORK/apply-pgtide.log" >&2; exit 1; }
    sleep 0.1
  done
  local samples="$WORK/apply-lag-samples" rss="$WORK/apply-rss-samples"; : > "$samples"; : > "$rss"
  sample_rss() { awk '/^VmRSS:/ {print $2}' "/proc/$follower/status" >> "$rss" 2>/dev/null || true; }
  while kill -0 "$load" 2>/dev/null; do
    pgtide_psql target apply_pgtide -At -c "SELECT extract(epoch FROM clock_timestamp() - max(at)) FROM bench_heartbeat" >> "$samples"
    sample_rss
    sleep 0.25
  done
  # Then, the load over (the lag figures are the steady load's alone), one big transaction:
  # pgtide's RSS is sampled until it is on the target.
  # One transaction of big_rows x 128 kB: 8,192 distinct md5 digests as bytes, computed once
  # (random, so neither pglz nor lz4 shrinks them), behind a per-row prefix; its marker row
  # commits with it.
  pgtide_psql source applybench -c "BEGIN" \
    -c "INSERT INTO bench_big (id, body) SELECT g, int4send(g) || b.block FROM (SELECT string_agg(decode(md5(i::text || random()::text), 'hex'), ''::bytea) AS block FROM generate_series(1, 8192) i) b, generate_series(1, $big_rows) g" \
    -c "INSERT INTO bench_marker (burst) VALUES ('big')" -c "COMMIT" > "$WORK/apply-big.log" 2>&1 &
  local big=$!
  wait "$beat" || true
  wait "$big" || { echo "the $big_rows x 128 kB transaction failed on the source; see $WORK/apply-big.log" >&2; tail -5 "$WORK/apply-big.log" >&2; exit 1; }
  # Follow runs until the big transaction is on the target, so the RSS maximum covers it.
  local big_deadline=$(( $(date +%s) + ${PGTIDE_BENCH_APPLY_TIMEOUT:-180} ))
  until [ "$(pgtide_psql target apply_pgtide -At -c "SELECT count(*) FROM bench_marker WHERE burst = 'big'")" = 1 ]; do
    kill -0 "$follower" 2>/dev/null || { echo "pgtide follow stopped before the big transaction was applied; see $WORK/apply-pgtide.log" >&2; exit 1; }
    [ "$(date +%s)" -le "$big_deadline" ] || { echo "pgtide did not apply the big transaction in ${PGTIDE_BENCH_APPLY_TIMEOUT:-180} s after the load; see $WORK/apply-pgtide.log" >&2; exit 1; }
    sample_rss
    sleep 0.25
  done
  sample_rss
  local hwm; hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$follower/status" 2>/dev/null || true)
  local big_on_target; big_on_target=$(pgtide_psql target apply_pgtide -At -c "SELECT count(*) || ' rows, ' || pg_size_pretty(sum(length(body))::bigint) FROM bench_big")
  local tps; tps=$(grep -oE 'tps = [0-9.]+' "$WORK/apply-load.log" | head -1 | awk '{printf "%.0f", $3}' || true)
  local lag_p50 lag_p95 lag_max rss_max_mb
  lag_p50=$(sort -g "$samples" | awk '{a[NR]=$1} END {printf "%.2f", a[int(NR*0.50)+1]}')
  lag_p95=$(sort -g "$samples" | awk '{a[NR]=$1} END {i=int(NR*0.95)+1; if (i>NR) i=NR; printf "%.2f", a[i]}')
  lag_max=$(sort -g "$samples" | awk 'END {printf "%.2f", $1}')
  rss_max_mb=$(sort -n "$rss" | tail -1 | awk '{printf "%.0f", $1 / 1024}')
  kill -0 "$follower" 2>/dev/null || { echo "pgtide follow stopped during the steady load; see $WORK/apply-pgtide.log" >&2; exit 1; }
  kill -INT "$follower" 2>/dev/null || true; wait "$follower" 2>/dev/null || true
  if grep -q '^$' "$samples" || [ ! -s "$samples" ]; then
    echo "the lag samples are incomplete (no heartbeat reached the target); see $WORK/apply-pgtide.log" >&2; exit 1
  fi

  echo
  echo "apply: pgbench scale $scale; A = ${changes_of[A]} changes from $((4 * scale * 1000)) TPC-B transactions (1 client), B = one ${changes_of[B]}-row UPDATE, F = ${changes_of[F]} UPDATEs/DELETEs in $full_txns transactions (2 clients) on a $full_rows-row REPLICA IDENTITY FULL table, C = A's transactions from 4 clients"
  cell() { case $1 in "n/a"*) echo n/a;; "not run"*) echo "not run";; stalled*) echo stalled;; *) echo "$1";; esac; }
  printf '%-10s %14s %14s %14s %14s   %s\n' tool "A changes/s" "B rows/s" "F changes/s" "C changes/s" verify
  for tool in pgtide pgcopydb native; do
    printf '%-10s %14s %14s %14s %14s   %s\n' "$tool" "$(cell "${rate[${tool}A]}")" "$(cell "${rate[${tool}B]}")" \
      "$(cell "${rate[${tool}F]}")" "$(cell "${rate[${tool}C]}")" "${rate[verify_$tool]}"
  done
  ratio_or_na() { case "$1:$2" in *:|:*|*:0|*[!0-9.:]*) echo n/a;; *) echo "scale=2; $1 / $2" | bc | sed 's/^\./0./';; esac; }
  started() { [ -n "${startup_of[$1]:-}" ] && printf ' (apply started after %.1f s; %d/s from then)' "${startup_of[$1]}" "${applyonly_of[$1]}"; true; }
  # The same ratio between the rates from each tool's apply start (native's worker is started
  # by the launcher some time after ENABLE; pgtide connects and checks first).
  applying_ratio() { ratio_or_na "${applyonly_of[pgtide$1]:-}" "${applyonly_of[native$1]:-}"; }
  # Burst F: a stalled tool's partial rate bounds the ratio from below.
  ratio_f() { if [ -n "${partial_of[$2]:-}" ]; then echo ">= $(ratio_or_na "${rate[pgtideF]}" "${partial_of[$2]}")"; else ratio_or_na "${rate[pgtideF]}" "${rate[$2]}"; fi; }
  echo "pgtide / pgcopydb:  A $(ratio_or_na "${rate[pgtideA]}" "${rate[pgcopydbA]}")   B $(ratio_or_na "${rate[pgtideB]}" "${rate[pgcopydbB]}")   F $(ratio_f F pgcopydbF)   C n/a"
  echo "pgtide / native:    A $(ratio_or_na "${rate[pgtideA]}" "${rate[nativeA]}")   B $(ratio_or_na "${rate[pgtideB]}" "${rate[nativeB]}")   F $(ratio_f F nativeF)   C $(ratio_or_na "${rate[pgtideC]}" "${rate[nativeC]}")"
  local steady
  steady="steady pgbench -c 4 (${tps:-?} tps on the source) while pgtide follows: lag p50 ${lag_p50} s, p95 ${lag_p95} s, max ${lag_max} s ($(wc -l < "$samples") samples); pgtide RSS max ${rss_max_mb:-?} MB ($(wc -l < "$rss") samples, peak VmHWM $(awk -v k="${hwm:-0}" 'BEGIN {printf "%.0f", k / 1024}') MB) incl. a $big_rows x 128 kB transaction ($big_on_target on the target)"
  echo "$steady"
  {
    echo "apply burst A (1 client TPC-B): pgtide ${rate[pgtideA]} changes/s$(started pgtideA), pgcopydb ${rate[pgcopydbA]}, native ${rate[nativeA]}$(started nativeA); pgtide/pgcopydb $(ratio_or_na "${rate[pgtideA]}" "${rate[pgcopydbA]}"), pgtide/native $(ratio_or_na "${rate[pgtideA]}" "${rate[nativeA]}") (from apply start $(applying_ratio A))"
    echo "apply burst B (${changes_of[B]}-row UPDATE): pgtide ${rate[pgtideB]} rows/s$(started pgtideB), pgcopydb ${rate[pgcopydbB]}, native ${rate[nativeB]}$(started nativeB); pgtide/pgcopydb $(ratio_or_na "${rate[pgtideB]}" "${rate[pgcopydbB]}"), pgtide/native $(ratio_or_na "${rate[pgtideB]}" "${rate[nativeB]}") (from apply start $(applying_ratio B))"
    echo "apply burst C (4 clients): pgtide ${rate[pgtideC]} changes/s$(started pgtideC), native ${rate[nativeC]} changes/s$(started nativeC), pgtide/native $(ratio_or_na "${rate[pgtideC]}" "${rate[nativeC]}") (from apply start $(applying_ratio C)); pgcopydb ${rate[pgcopydbC]}"
    echo "apply burst F (FULL identity, $full_rows rows, PG15 target): pgtide ${rate[pgtideF]} changes/s$(started pgtideF), native ${rate[nativeF]}, pgcopydb ${rate[pgcopydbF]}; pgtide/native $(ratio_f F nativeF), pgtide/pgcopydb $(ratio_f F pgcopydbF)"
    echo "steady pgbench -c 4 (${tps:-?} tps): lag p50 ${lag_p50} s, p95 ${lag_p95} s, max ${lag_max} s; pgtide RSS max ${rss_max_mb:-?} MB (incl. a $big_rows x 128 kB transaction); follow applied its first transaction $(printf '%.1f' "$follow_ready") s after its start"
  } >> "$WORK/summary"
  pgtide_psql target apply_native -c "ALTER SUBSCRIPTION bench_native DISABLE" -c "ALTER SUBSCRIPTION bench_native SET (slot_name = NONE)" -c "DROP SUBSCRIPTION bench_native" >/dev/null 2>&1 || true
}
