#!/usr/bin/env bash
# Soak: a long-running follower under mixed traffic, compressed into minutes (issue 13, item 4).
# On demand only (CI does not run it):   scripts/soak.sh [DURATION]   (30s, 10m, 2h; default 10m)
#
# What it proves: a `pgtide clone --follow` that keeps following while the source writes all
# the time and, periodically,
#   - changes its schema (columns added with a constant default, indexes created, also
#     CONCURRENTLY, a new table created and filled, columns renamed, a column added to the
#     REPLICA IDENTITY FULL table: what DDL capture replays, README "Schema changes during
#     follow"),
#   - loses pgtide (SIGKILL, then `pgtide follow` resumes from the work dir),
#   - loses the target server (pg_ctl restart -m fast) and the walsender
#     (pg_terminate_backend on the slot's active_pid),
# keeps its spool, the slot's retained WAL on the source and its own RSS flat, and ends, after
# `pgtide cutover`, with a target identical to the source (cutover's checksum verify,
# `pgtide verify`, and a per-table md5 of every row computed here on both sides).
#
# How to read its output (stdout; pgtide's own log is in WORK/pgtide.log):
#   - one line per sample (every PGTIDE_SOAK_SAMPLE seconds, default 30), e.g.
#       t=   90s following  spool    4.1 MiB   retained WAL    0.3 MiB   rss   15.3 MiB   lag   0.7s / 0.1 MiB
#     t is counted from the moment apply started following (the clone ran before that);
#     the same figures, raw, go to WORK/soak.csv (elapsed_s,phase,pid,spool_bytes,
#     retained_wal_bytes,rss_kb,lag_seconds,lag_bytes,event);
#   - "==" lines name each disturbance when it happens (ddl, kill pgtide, restart target,
#     terminate walsender);
#   - the summary gives min/max/last of spool size, retained WAL and RSS over the samples taken
#     while following, and a verdict per figure: "flat" when the maximum over the last third
#     of the run is at most twice the maximum over the first third plus a slack (spool 16 MiB,
#     WAL 64 MiB, RSS 32 MiB), "GROWING" otherwise; then the content comparison.
#     (lag: seconds, then bytes of WAL behind the source, as `pgtide status` reports them)
# Exit status: 0 when everything is identical, pgtide never died on its own, the source took
# every schema change and every figure stayed flat; 1 otherwise (the reasons are printed last).
#
# Runs its own PostgreSQL 15 pair (scripts/clusters.sh: a temp dir, random free ports, as the
# postgres OS user), so it does not collide with a concurrent scripts/test.sh; both are stopped
# on exit. The password comes from the environment (PGPASSWORD), never from argv.
# Settings: PGTIDE_SOAK_TPS (traffic rate, default 40 transactions/s over 2 clients),
# PGTIDE_SOAK_SAMPLE (seconds, 30), PGTIDE_SOAK_DDL_EVERY (120), PGTIDE_SOAK_KILL_EVERY (300),
# PGTIDE_SOAK_TARGET_RESTART_EVERY (900), PGTIDE_SOAK_WALSENDER_EVERY (420): each period is also
# capped to a fraction of DURATION so that a short run sees every disturbance at least once.
set -euo pipefail
cd "$(dirname "$0")/.."

to_seconds() { # 90 | 90s | 10m | 2h
  local v=$1
  case $v in
    *h) echo $(( ${v%h} * 3600 ));; *m) echo $(( ${v%m} * 60 ));; *s) echo "${v%s}";;
    *[!0-9]*|'') echo "bad duration: $v (use e.g. 30s, 10m, 2h)" >&2; return 1;;
    *) echo "$v";;
  esac
}
DURATION=$(to_seconds "${1:-10m}")
[ "$DURATION" -ge 60 ] || { echo "DURATION must be at least 1m" >&2; exit 2; }
TPS=${PGTIDE_SOAK_TPS:-40}
SAMPLE=${PGTIDE_SOAK_SAMPLE:-30}
min() { [ "$1" -lt "$2" ] && echo "$1" || echo "$2"; }
DDL_EVERY=$(min "${PGTIDE_SOAK_DDL_EVERY:-120}" $(( DURATION / 5 )))
KILL_EVERY=$(min "${PGTIDE_SOAK_KILL_EVERY:-300}" $(( DURATION / 3 )))
TARGET_EVERY=$(min "${PGTIDE_SOAK_TARGET_RESTART_EVERY:-900}" $(( DURATION / 2 )))
WALSENDER_EVERY=$(min "${PGTIDE_SOAK_WALSENDER_EVERY:-420}" $(( DURATION / 3 )))
SLOT=soak

source scripts/clusters.sh
pgtide_install_deps
cargo build --release --quiet
PGTIDE=$PWD/target/release/pgtide
WORK=$(mktemp -d /tmp/pgtide-soak.XXXXXX)   # outlives the clusters: logs, CSV, work dir
DIR=$WORK/work
CSV=$DIR/soak.csv
LOG=$WORK/pgtide.log
: > "$LOG"
PGTIDE_PID=
PGBENCH_PID=

cleanup() {
  local rc=$?
  [ -n "$PGBENCH_PID" ] && kill "$PGBENCH_PID" 2>/dev/null
  [ -n "$PGTIDE_PID" ] && kill -KILL "$PGTIDE_PID" 2>/dev/null
  wait 2>/dev/null
  pgtide_stop_clusters
  echo "logs, CSV and work dir: $WORK" >&2
  exit "$rc"
}
trap cleanup EXIT
pgtide_start_clusters
export PGPASSWORD=$PGTIDE_TEST_PASSWORD
export PGTIDE_SOURCE_PGURI="postgres://postgres@127.0.0.1:$PGTIDE_SOURCE_PORT/soak"
export PGTIDE_TARGET_PGURI="postgres://postgres@127.0.0.1:$PGTIDE_TARGET_PORT/soak"
export PGTIDE_DIR=$DIR PGTIDE_NO_PROGRESS=1
src() { pgtide_psql source soak "$@"; }
dst() { pgtide_psql target soak "$@"; }

echo "== source: tables wide (TOASTed text), full_ident (REPLICA IDENTITY FULL), events (partitioned)"
pgtide_psql source postgres -c "CREATE DATABASE soak"
pgtide_psql target postgres -c "CREATE DATABASE soak"
src <<'SQL'
CREATE TABLE wide (id bigserial PRIMARY KEY, payload text NOT NULL, note text, touched timestamptz);
-- 100 md5s of random data: ~3.2 kB that pglz cannot shrink, so the value lives in TOAST and an
-- update of another column sends it as "unchanged TOAST".
INSERT INTO wide (payload, note)
  SELECT (SELECT string_agg(md5(random()::text || g || x), '') FROM generate_series(1, 100) x), 'init'
  FROM generate_series(1, 2000) g;
CREATE SEQUENCE fi_k;
CREATE TABLE full_ident (k bigint NOT NULL, v text, n numeric);
ALTER TABLE full_ident REPLICA IDENTITY FULL;
CREATE INDEX full_ident_k ON full_ident (k);
INSERT INTO full_ident SELECT nextval('fi_k'), md5(g::text), g / 7.0 FROM generate_series(1, 5000) g;
CREATE TABLE events (id bigserial, kind int NOT NULL, body text, n int NOT NULL DEFAULT 0,
  PRIMARY KEY (id)) PARTITION BY HASH (id);
CREATE TABLE events_0 PARTITION OF events FOR VALUES WITH (MODULUS 4, REMAINDER 0);
CREATE TABLE events_1 PARTITION OF events FOR VALUES WITH (MODULUS 4, REMAINDER 1);
CREATE TABLE events_2 PARTITION OF events FOR VALUES WITH (MODULUS 4, REMAINDER 2);
CREATE TABLE events_3 PARTITION OF events FOR VALUES WITH (MODULUS 4, REMAINDER 3);
INSERT INTO events (kind, body) SELECT g % 5, md5(g::text) FROM generate_series(1, 20000) g;
ANALYZE;
SQL

# The application: pgbench, 2 clients at TPS transactions/s in total, a mix of inserts, updates
# (TOASTed column left alone or changed) and deletes on all three tables, single statements and
# a multi-table transaction. Traffic never names a column the DDL below adds or renames.
mkdir -p "$WORK/traffic"
cat > "$WORK/traffic/ins.sql" <<'SQL'
\set r random(0, 4)
INSERT INTO wide (payload, note) SELECT string_agg(md5(random()::text || x), ''), 'ins' FROM generate_series(1, 100) x;
INSERT INTO full_ident (k, v, n) VALUES (nextval('fi_k'), md5(random()::text), round((random() * 1000)::numeric, 3));
INSERT INTO events (kind, body) VALUES (:r, md5(random()::text));
SQL
cat > "$WORK/traffic/upd.sql" <<'SQL'
\set r random(0, 200)
UPDATE wide SET note = 'upd ' || :r, touched = now() WHERE id = (SELECT max(id) - :r FROM wide);
UPDATE full_ident SET v = md5(v), n = n + 1 WHERE k = (SELECT max(k) - :r FROM full_ident);
UPDATE events SET body = md5(body), n = n + 1 WHERE id = (SELECT max(id) - :r FROM events);
SQL
cat > "$WORK/traffic/toast.sql" <<'SQL'
\set r random(0, 500)
UPDATE wide SET payload = md5(payload) || payload WHERE id = (SELECT max(id) - :r FROM wide);
SQL
cat > "$WORK/traffic/del.sql" <<'SQL'
\set r random(0, 50)
DELETE FROM wide WHERE id = (SELECT min(id) + :r FROM wide);
DELETE FROM full_ident WHERE k = (SELECT min(k) + :r FROM full_ident);
DELETE FROM events WHERE id = (SELECT min(id) + :r FROM events);
SQL
cat > "$WORK/traffic/txn.sql" <<'SQL'
\set r random(0, 100)
BEGIN;
INSERT INTO events (kind, body) VALUES (:r % 5, 'txn');
UPDATE wide SET note = 'txn', touched = now() WHERE id = (SELECT max(id) - :r FROM wide);
DELETE FROM full_ident WHERE k = (SELECT max(k) - :r - 100 FROM full_ident);
UPDATE events SET n = n - 1 WHERE id = (SELECT max(id) - :r FROM events);
COMMIT;
SQL

now() { date +%s; }
start_follow() { # clone --follow (first start) or follow (every restart)
  LOG_MARK=$(( $(wc -l < "$LOG") + 1 ))   # its log starts at this line
  if [ "$1" = clone ]; then
    "$PGTIDE" clone --follow --slot-name "$SLOT" --table-jobs 2 --index-jobs 2 >> "$LOG" 2>&1 &
  else
    "$PGTIDE" follow >> "$LOG" 2>&1 &
  fi
  PGTIDE_PID=$!
  echo "-- pgtide $1 started: pid $PGTIDE_PID ($(date -u +%FT%TZ))" >> "$LOG"
}
alive() { [ -n "$PGTIDE_PID" ] && [ -r "/proc/$PGTIDE_PID/status" ] && ! grep -q '^State:.*Z' "/proc/$PGTIDE_PID/status"; }
UNEXPECTED_DEATHS=0
FAILURES=()
check_alive() { # pgtide must only ever stop when this script kills it
  alive && return 0
  local rc=0; wait "$PGTIDE_PID" || rc=$?
  UNEXPECTED_DEATHS=$((UNEXPECTED_DEATHS + 1))
  echo "!! pgtide (pid $PGTIDE_PID) died on its own, exit status $rc; its last log lines:"
  tail -15 "$LOG" | sed 's/^/   | /'
  FAILURES+=("pgtide died on its own (exit $rc, pid $PGTIDE_PID)")
  if [ "$UNEXPECTED_DEATHS" -ge 3 ]; then
    echo "!! giving up after 3 unexpected deaths"; return 1
  fi
  start_follow follow
}
json_status() { "$PGTIDE" status --json 2>/dev/null || echo '{}'; }

echo "== pgtide clone --follow (slot $SLOT, work dir $DIR), traffic at $TPS tx/s"
"$PG_BIN/pgbench" -n -c 2 -j 2 -R "$TPS" -T $(( DURATION + 3600 )) -h 127.0.0.1 -p "$PGTIDE_SOURCE_PORT" \
  -U postgres -f "$WORK/traffic/ins.sql@4" -f "$WORK/traffic/upd.sql@4" -f "$WORK/traffic/toast.sql@1" \
  -f "$WORK/traffic/del.sql@2" -f "$WORK/traffic/txn.sql@2" soak > "$WORK/traffic.log" 2>&1 &
PGBENCH_PID=$!
start_follow clone
t_clone=$(now)
until [ "$(json_status | jq -r '.phase // empty')" = following ]; do
  alive || { echo "clone --follow failed:"; tail -30 "$LOG"; exit 1; }
  [ $(( $(now) - t_clone )) -lt 600 ] || { echo "clone did not reach following in 10 min"; tail -30 "$LOG"; exit 1; }
  sleep 2
done
echo "== following after $(( $(now) - t_clone ))s of clone; soak for ${DURATION}s: ddl every ${DDL_EVERY}s, kill pgtide every ${KILL_EVERY}s, restart target every ${TARGET_EVERY}s, terminate walsender every ${WALSENDER_EVERY}s, sample every ${SAMPLE}s"

# --- the disturbances -------------------------------------------------------------------------
DDL_N=0
DDL_REFUSED=0
# A schema change the source refuses is pgtide's fault (its event trigger runs inside the
# application's statement): record it and go on.
ddl_sql() {
  local out
  if ! out=$(src "$@" 2>&1); then
    DDL_REFUSED=$((DDL_REFUSED + 1))
    echo "!! the source refused the application's DDL:"; sed 's/^/   | /' <<<"$out"
    FAILURES+=("the source refused DDL: $* ($(head -1 <<<"$out"))")
  fi
}
LAST_NEW_TABLE=
LAST_EXTRA=
ddl() {
  DDL_N=$((DDL_N + 1))
  local n=$DDL_N
  case $(( (n - 1) % 5 )) in
    0) echo "== ddl $n: ALTER TABLE wide ADD COLUMN extra_$n int NOT NULL DEFAULT 7"
       ddl_sql -c "ALTER TABLE wide ADD COLUMN extra_$n int NOT NULL DEFAULT 7"
       LAST_EXTRA=extra_$n;;
    1) echo "== ddl $n: CREATE INDEX CONCURRENTLY on wide (note), CREATE INDEX on events (kind, n)"
       ddl_sql -c "CREATE INDEX CONCURRENTLY wide_note_$n ON wide (note)"
       ddl_sql -c "CREATE INDEX events_kind_$n ON events (kind, n)";;
    2) echo "== ddl $n: CREATE TABLE new_$n, filled with 5000 rows, then updated and deleted from"
       ddl_sql -c "CREATE TABLE new_$n (id bigint PRIMARY KEY, v text, amount numeric(12,2) DEFAULT 0)"
       ddl_sql -c "INSERT INTO new_$n (id, v, amount) SELECT g, md5(g::text), g * 1.25 FROM generate_series(1, 5000) g"
       ddl_sql -c "UPDATE new_$n SET v = upper(v) WHERE id % 10 = 0" -c "DELETE FROM new_$n WHERE id % 97 = 0"
       LAST_NEW_TABLE=new_$n;;
    3) if [ -n "$LAST_NEW_TABLE" ]; then
         echo "== ddl $n: ALTER TABLE $LAST_NEW_TABLE RENAME COLUMN v TO v_$n; ALTER TABLE wide RENAME COLUMN $LAST_EXTRA TO ${LAST_EXTRA}_r$n"
         ddl_sql -c "ALTER TABLE $LAST_NEW_TABLE RENAME COLUMN v TO v_$n"
         ddl_sql -c "UPDATE $LAST_NEW_TABLE SET v_$n = v_$n || '!' WHERE id % 7 = 0"
       else
         echo "== ddl $n: ALTER TABLE wide RENAME COLUMN $LAST_EXTRA TO ${LAST_EXTRA}_r$n"
       fi
       ddl_sql -c "ALTER TABLE wide RENAME COLUMN $LAST_EXTRA TO ${LAST_EXTRA}_r$n"
       LAST_EXTRA=${LAST_EXTRA}_r$n;;
    4) echo "== ddl $n: ALTER TABLE events (partitioned) ADD COLUMN tag_$n text DEFAULT 'soak'; ALTER TABLE full_ident (REPLICA IDENTITY FULL) ADD COLUMN tag_$n text DEFAULT 'soak'"
       ddl_sql -c "ALTER TABLE events ADD COLUMN tag_$n text DEFAULT 'soak'"
       ddl_sql -c "ALTER TABLE full_ident ADD COLUMN tag_$n text DEFAULT 'soak'";;
  esac
}
kill_pgtide() {
  echo "== kill -KILL pgtide (pid $PGTIDE_PID), then pgtide follow"
  kill -KILL "$PGTIDE_PID"
  wait "$PGTIDE_PID" 2>/dev/null || true
  echo "-- pgtide pid $PGTIDE_PID killed by soak.sh ($(date -u +%FT%TZ))" >> "$LOG"
  start_follow follow
  # Let it get going before the next disturbance: `pgtide follow` checks both servers when it
  # starts and stops at once if one is down (the running follower reconnects instead).
  local t=0
  until sed -n "$LOG_MARK,\$p" "$LOG" | grep -q 'apply: resuming after'; do
    alive && [ "$t" -lt 60 ] || break
    sleep 1; t=$((t + 1))
  done
}
restart_target() {
  echo "== restart of the target server (pg_ctl restart -m fast)"
  _pgtide_as_postgres "$PG_BIN/pg_ctl" -D "$PGTIDE_CLUSTERS_DIR/target" -l "$PGTIDE_CLUSTERS_DIR/target.log" \
    -m fast -w restart >/dev/null
}
terminate_walsender() {
  local n
  n=$(src -At -c "SELECT count(pg_terminate_backend(active_pid)) FROM pg_replication_slots WHERE slot_name = '$SLOT' AND active_pid IS NOT NULL")
  echo "== terminate the walsender of slot $SLOT ($n terminated)"
}

# --- sampling ---------------------------------------------------------------------------------
mib() { awk -v b="$1" 'BEGIN { if (b == "") print "?"; else printf "%.1f MiB", b / 1048576 }'; }
umask 077
echo "elapsed_s,phase,pid,spool_bytes,retained_wal_bytes,rss_kb,lag_seconds,lag_bytes,event" > "$CSV"
LAST_EVENT=
sample() {
  local t=$1 st phase spool lag_s lag_b retained rss
  st=$(json_status)
  phase=$(jq -r '.phase // "?"' <<<"$st")
  spool=$(jq -r '.spool_bytes // empty' <<<"$st")
  lag_s=$(jq -r '.lag_seconds // empty' <<<"$st")
  lag_b=$(jq -r '.lag_bytes // empty' <<<"$st")
  # Asked of the source directly, not through status: the figure must not depend on pgtide.
  retained=$(src -At -c "SELECT pg_current_wal_lsn() - restart_lsn FROM pg_replication_slots WHERE slot_name = '$SLOT'" 2>/dev/null || true)
  rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$PGTIDE_PID/status" 2>/dev/null || true)
  echo "$t,$phase,$PGTIDE_PID,$spool,$retained,$rss,$lag_s,$lag_b,$LAST_EVENT" >> "$CSV"
  printf 't=%5ss %-10s spool %10s   retained WAL %10s   rss %10s   lag %5ss / %s\n' "$t" "$phase" \
    "$(mib "$spool")" "$(mib "$retained")" "$(mib $(( ${rss:-0} * 1024 )))" \
    "$([ -n "$lag_s" ] && printf '%.1f' "$lag_s" || echo '?')" "$(mib "$lag_b")"
  LAST_EVENT=
}

# --- the soak loop ----------------------------------------------------------------------------
T0=$(now)
next_sample=0
next_ddl=$(( DDL_EVERY / 2 ))
next_kill=$(( KILL_EVERY * 2 / 3 ))
next_target=$(( TARGET_EVERY * 3 / 4 ))
next_walsender=$(( WALSENDER_EVERY / 3 ))
while :; do
  t=$(( $(now) - T0 ))
  [ "$t" -lt "$DURATION" ] || break
  check_alive
  kill -0 "$PGBENCH_PID" 2>/dev/null || { echo "!! the traffic (pgbench) stopped:"; tail -5 "$WORK/traffic.log"; FAILURES+=("traffic stopped early"); break; }
  if [ "$t" -ge "$next_ddl" ]; then ddl; LAST_EVENT+="ddl $DDL_N;"; next_ddl=$(( next_ddl + DDL_EVERY )); fi
  # One failure at a time (a second one due waits for the next tick).
  if [ "$t" -ge "$next_kill" ]; then kill_pgtide; LAST_EVENT+="kill;"; next_kill=$(( next_kill + KILL_EVERY ))
  elif [ "$t" -ge "$next_target" ]; then restart_target; LAST_EVENT+="target restart;"; next_target=$(( next_target + TARGET_EVERY ))
  elif [ "$t" -ge "$next_walsender" ]; then terminate_walsender; LAST_EVENT+="walsender;"; next_walsender=$(( next_walsender + WALSENDER_EVERY )); fi
  if [ "$t" -ge "$next_sample" ]; then sample "$t"; next_sample=$(( next_sample + SAMPLE )); fi
  sleep 2
done

# --- the end: stop traffic, cutover, compare --------------------------------------------------
echo "== stopping the traffic"
kill "$PGBENCH_PID" 2>/dev/null || true
wait "$PGBENCH_PID" 2>/dev/null || true
PGBENCH_PID=
if grep -q 'aborted\|ERROR' "$WORK/traffic.log"; then
  echo "!! the traffic had errors (not pgtide's, but the soak was weaker):"; grep -m5 'aborted\|ERROR' "$WORK/traffic.log" | sed 's/^/   | /'
fi
check_alive
sample $(( $(now) - T0 ))
src -At -F ' ' -c "SELECT 'traffic on the source: ' || sum(n_tup_ins) || ' inserts, ' || sum(n_tup_upd) || ' updates, ' || sum(n_tup_del) || ' deletes' FROM pg_stat_user_tables WHERE schemaname = 'public'"

echo "== pgtide cutover (follow pid $PGTIDE_PID)"
rc=0
"$PGTIDE" cutover --timeout 5m > "$WORK/cutover.log" 2>&1 || rc=$?
sed 's/^/   | /' "$WORK/cutover.log"
[ "$rc" = 0 ] || FAILURES+=("cutover failed (exit $rc)")
rc=0
for _ in $(seq 60); do alive || break; sleep 1; done
if alive; then
  FAILURES+=("follow still running 60 s after the cutover")
else
  wait "$PGTIDE_PID" || rc=$?
  [ "$rc" = 0 ] || FAILURES+=("follow ended with exit status $rc at cutover")
fi
PGTIDE_PID=

echo "== pgtide verify"
rc=0
"$PGTIDE" verify > "$WORK/verify.log" 2>&1 || rc=$?
tail -5 "$WORK/verify.log" | sed 's/^/   | /'
[ "$rc" = 0 ] || FAILURES+=("pgtide verify: source and target differ (see $WORK/verify.log)")

echo "== per-table md5 of every row (source vs target)"
tables=$(src -At -c "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgtide') ORDER BY 1")
TABLE_DIFFS=0
for tbl in $tables; do
  # Order-independent: the md5 of the sorted md5s of each row's text (columns in table order).
  q="SELECT count(*) || ' ' || coalesce(md5(string_agg(h, '' ORDER BY h)), '-') FROM (SELECT md5(t::text) h FROM $tbl t) s"
  s=$(src -At -c "$q")
  d=$(dst -At -c "$q" 2>&1) || d="missing: $d"
  if [ "$s" = "$d" ]; then printf '   %-22s %s  identical\n' "$tbl" "$s"
  else printf '   %-22s source %s  target %s  DIFFERENT\n' "$tbl" "$s" "$d"; TABLE_DIFFS=$((TABLE_DIFFS + 1)); fi
done
[ "$TABLE_DIFFS" = 0 ] || FAILURES+=("$TABLE_DIFFS table(s) differ by content")

echo "== summary (samples taken while following; CSV: $CSV)"
summary() { # column-number label slack-bytes scale(bytes per unit)
  awk -F, -v col="$1" -v label="$2" -v slack="$3" -v scale="$4" '
    NR > 1 && $2 == "following" && $col != "" { v[++n] = $col * scale }
    END {
      if (n < 3) { printf "%-13s too few samples (%d)\n", label, n; exit 0 }
      mn = v[1]; mx = v[1]; for (i = 1; i <= n; i++) { if (v[i] < mn) mn = v[i]; if (v[i] > mx) mx = v[i] }
      third = int(n / 3); if (third < 1) third = 1
      f = 0; for (i = 1; i <= third; i++) if (v[i] > f) f = v[i]
      l = 0; for (i = n - third + 1; i <= n; i++) if (v[i] > l) l = v[i]
      flat = (l <= 2 * f + slack)
      printf "%-13s min %8.1f MiB  max %8.1f MiB  last %8.1f MiB   first third max %.1f, last third max %.1f: %s\n",
        label, mn / 1048576, mx / 1048576, v[n] / 1048576, f / 1048576, l / 1048576, flat ? "flat" : "GROWING"
      exit flat ? 0 : 3
    }' "$CSV"
}
for spec in "4 spool 16777216 1" "5 retained_WAL 67108864 1" "6 rss 33554432 1024"; do
  # shellcheck disable=SC2086
  set -- $spec
  summary "$1" "$2" "$3" "$4" || FAILURES+=("$2 kept growing")
done
echo "disturbances: $DDL_N ddl ($DDL_REFUSED refused by the source), pgtide killed $(grep -c 'killed by soak.sh' "$LOG") times, unexpected pgtide deaths: $UNEXPECTED_DEATHS"
if [ ${#FAILURES[@]} -eq 0 ]; then
  echo "SOAK PASSED: ${DURATION}s, target identical, spool, retained WAL and RSS flat"
else
  echo "SOAK FAILED:"; printf '  - %s\n' "${FAILURES[@]}"
  exit 1
fi
