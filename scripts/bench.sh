#!/usr/bin/env bash
# Benchmark: pgtide against pgcopydb 0.10, native logical replication and pg_dump/pg_restore on
# the same source data in one run, each result verified by checksum; every ratio is printed, and
# the lines to paste into an issue note are repeated at the end ("== summary").
#   scripts/bench.sh [SCALE] [JOBS]      (defaults: pgbench scale 50, 2 jobs)
# Clone side:
#   1. pgbench scale SCALE + tests/fixtures/hard_cases.sql: pgtide clone (its default split
#      policy, auto, which measures the cores both servers have for the copy and prints what it
#      planned; --split-tables-larger-than PGTIDE_BENCH_SPLIT, default 100MB; and --fast-restore,
#      the target tuned for the load and restored after it), pgcopydb clone (unsplit and
#      split), pg_dump -Fd | pg_restore, and a physical-limit estimate; prints wall times and the
#      ratios pgtide/best pgcopydb, pgtide/dump-restore, pgtide/limit.
#   2. TOAST-heavy: database toastbench, one table of text + jsonb + bytea values (random hex and
#      bytes, so that TOAST stores them out of line), about PGTIDE_BENCH_TOAST_MB (default 1000)
#      MB; cloned by pgtide and pgcopydb, unsplit and split (PGTIDE_BENCH_TOAST_SPLIT, default
#      PGTIDE_BENCH_SPLIT); prints times and pgtide/best pgcopydb. PGTIDE_BENCH_TOAST_KEEP=1 adds
#      a pgtide run with --toast-compression keep (the target's pglz; the lz4-vs-pglz comparison
#      alone, twice each: scripts/bench-toast.sh). PGTIDE_BENCH_TOAST_MB=0 skips this part.
#   Only pgtide's own failure (or a pgtide result that differs) aborts the run; another tool's is
#   reported as failed.
# Apply side (scripts/bench-apply.sh, pgbench scale PGTIDE_BENCH_APPLY_SCALE, default 10):
#   bursts A (TPC-B, 1 client), F (UPDATEs/DELETEs on a REPLICA IDENTITY FULL table, 2
#   clients), B (one 500,000-row UPDATE) and C (TPC-B, 4 clients) drained by pgtide, pgcopydb (not C)
#   and native logical replication; then pgtide's lag and RSS under a steady pgbench -c 4 load of
#   PGTIDE_BENCH_LOAD_SECONDS (default 30) with one 6,000 x 128 kB transaction
#   (PGTIDE_BENCH_BIG_ROWS) in it. PGTIDE_BENCH_APPLY_TIMEOUT (default 180 s) caps each drain.
# Then the spool write throughput (cargo bench).
# PGTIDE_BENCH_ONLY=clone|apply runs one side only.
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
# On any exit: stop what this script still runs in the background (a follow, pgbench, a
# pgcopydb and its workers), then the clusters.
bench_cleanup() {
  local p
  for p in $(jobs -p); do
    # shellcheck disable=SC2046 # one pid per word
    kill "$p" $(pgrep -P "$p") 2>/dev/null || true
  done
  pgtide_stop_clusters
}
trap bench_cleanup EXIT
pgtide_start_clusters
export PGPASSWORD=$PGTIDE_TEST_PASSWORD      # every tool gets it from the environment, not argv
src_uri() { echo "postgres://postgres@127.0.0.1:$PGTIDE_SOURCE_PORT/$1"; }
dst_uri() { echo "postgres://postgres@127.0.0.1:$PGTIDE_TARGET_PORT/$1"; }
WORK=$(mktemp -d /tmp/pgtide-bench.XXXXXX)
: > "$WORK/summary"   # the lines to paste into an issue note, printed last

ONLY=${PGTIDE_BENCH_ONLY:-}
clone_bench() {
echo "== source: pgbench scale $SCALE + hard cases" >&2
pgtide_psql source postgres -c "CREATE DATABASE bench"
"$PG_BIN/pgbench" -q -i -s "$SCALE" -h 127.0.0.1 -p "$PGTIDE_SOURCE_PORT" -U postgres bench >/dev/null 2>&1
pgtide_psql source bench -f tests/fixtures/hard_cases.sql >/dev/null
pgtide_psql source bench -c "VACUUM ANALYZE" -c "CHECKPOINT"
pgtide_psql source bench -At -c "SELECT 'source size: ' || pg_size_pretty(pg_database_size('bench'))" >&2

# pgcopydb 0.10 fails on a table with both a primary key and an exclusion constraint
# ("relation bookings_pkey already exists" in its post-data restore), so its runs leave that
# 100-row table out, and their verify does too.
printf '[exclude-table]\npublic.bookings\n' > "$WORK/pgcopydb-filters.ini"

declare -A SECONDS_OF VERDICT_OF
# run NAME COMMAND…: clones CLONE_DB into target database NAME with COMMAND, times it and verifies
# it against CLONE_DB; a failure of a tool other than pgtide sets SECONDS_OF[NAME]=failed.
CLONE_DB=bench
run() { # name command…
  local name=$1; shift
  local verify_filters=()
  case $CLONE_DB:$name in bench:pgcopydb*) verify_filters=(--filters "$WORK/pgcopydb-filters.ini");; esac
  pgtide_psql target postgres -c "DROP DATABASE IF EXISTS \"$name\" WITH (FORCE)" -c "CREATE DATABASE \"$name\""
  pgtide_psql target postgres -c "CHECKPOINT"
  echo "== $name" >&2
  local t0 t1
  t0=$(date +%s.%N)
  if ! "$@" > "$WORK/$name.log" 2>&1; then
    echo "$name failed; see $WORK/$name.log" >&2; tail -20 "$WORK/$name.log" >&2
    case $name in *pgtide*) exit 1;; esac
    SECONDS_OF[$name]=failed; VERDICT_OF[$name]="FAILED: $(tail -1 "$WORK/$name.log" | cut -c1-160)"
    return 0
  fi
  t1=$(date +%s.%N)
  # What --split-tables-larger-than auto planned (measured cores, streams).
  case $name in *pgtide*) grep -oE "measured the cores free for the copy.*|planning the copy for [0-9]+ cores.*" "$WORK/$name.log" | sed "s/^/   $name: /" >&2 || true;; esac
  SECONDS_OF[$name]=$(echo "$t1 - $t0" | bc)
  echo "   $name: ${SECONDS_OF[$name]} s" >&2
  if "$PGTIDE" verify --source "$(src_uri "$CLONE_DB")" --target "$(dst_uri "$name")" "${verify_filters[@]}" > "$WORK/$name.verify" 2>&1; then
    VERDICT_OF[$name]="verified identical"
  else
    # pgtide itself must be exact; another tool's differences are reported, not fatal.
    case $name in *pgtide*) echo "$name: VERIFY FAILED" >&2; tail -30 "$WORK/$name.verify" >&2; exit 1;; esac
    VERDICT_OF[$name]="DIFFERS: $({ grep -E '^  (sequence|index|constraint) |DIFFERENT' "$WORK/$name.verify" || true; } | sed 's/^ *//' | paste -sd ';' -)"
  fi
  echo "   $name: ${VERDICT_OF[$name]}" >&2
}

# pgtide plan's estimate of the clone, before it runs (issue 15: within 2x of the measured time).
plan_estimate() {
  "$PGTIDE" plan --json --source "$(src_uri "$1")" --target "$(dst_uri postgres)" --dir "$WORK/plan-dir" \
    --table-jobs "$JOBS" --index-jobs "$JOBS" 2> "$WORK/plan-$1.log" > "$WORK/plan-$1.json"
  python3 -c 'import json, sys
plan = json.load(open(sys.argv[1]))
e = plan["estimate"]
print("   plan: copy %.1f s, indexes %.1f s, vacuum %.1f s, schema %.1f s; samples: %s" % (
    e["copy_seconds"], e["index_seconds"], e["vacuum_seconds"], e["schema_seconds"],
    "; ".join("%s %.0f MB copy %.2f s index %.2f s vacuum %.2f s" % (s["table"], s["disk_bytes"] / 1e6,
              s["copy_seconds"], s["index_seconds"], s["vacuum_seconds"]) for s in plan["samples"])), file=sys.stderr)
print(round(e["seconds"], 1))' "$WORK/plan-$1.json"
}
PLAN_BENCH=$(plan_estimate bench || echo failed)
echo "   pgtide plan estimates the pgtide clone at $PLAN_BENCH s" >&2
run pgtide "$PGTIDE" clone --source "$(src_uri bench)" --target "$(dst_uri pgtide)" --dir "$WORK/pgtide-dir" \
  --table-jobs "$JOBS" --index-jobs "$JOBS"
run pgtide_split "$PGTIDE" clone --source "$(src_uri bench)" --target "$(dst_uri pgtide_split)" --dir "$WORK/pgtide-split-dir" \
  --table-jobs "$JOBS" --index-jobs "$JOBS" --split-tables-larger-than "$SPLIT"
run pgtide_fast "$PGTIDE" clone --source "$(src_uri bench)" --target "$(dst_uri pgtide_fast)" --dir "$WORK/pgtide-fast-dir" \
  --table-jobs "$JOBS" --index-jobs "$JOBS" --fast-restore
run pgcopydb pgcopydb clone --source "$(src_uri bench)" --target "$(dst_uri pgcopydb)" --dir "$WORK/pgcopydb-dir" \
  --table-jobs "$JOBS" --index-jobs "$JOBS" --filters "$WORK/pgcopydb-filters.ini"
run pgcopydb_split pgcopydb clone --source "$(src_uri bench)" --target "$(dst_uri pgcopydb_split)" --dir "$WORK/pgcopydb-split-dir" \
  --table-jobs "$JOBS" --index-jobs "$JOBS" --split-tables-larger-than "$SPLIT" --filters "$WORK/pgcopydb-filters.ini"
dump_restore() {
  "$PG_BIN/pg_dump" -Fd -j "$JOBS" -f "$WORK/dump" -d "$(src_uri bench)"
  "$PG_BIN/pg_restore" -j "$JOBS" -d "$(dst_uri dump_restore)" "$WORK/dump"
  rm -rf "$WORK/dump"
}
run dump_restore dump_restore

# Physical limit: the three costs a copy cannot avoid, measured alone with the same JOBS:
# reading every table (COPY out to files), loading it into index-less tables (COPY in from the
# files), building indexes and constraints (post-data). Reading and loading overlap in a
# streaming copy, so the estimate is max(read, load) + post-data.
limit() {
  local list="$WORK/limit-tables"
  pgtide_psql source bench -At -c "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r' AND n.nspname IN ('public', 'sales') ORDER BY pg_relation_size(c.oid) DESC" > "$list"
  "$PG_BIN/pg_dump" --section=pre-data -d "$(src_uri bench)" | pgtide_psql target physical_limit >/dev/null
  "$PG_BIN/pg_dump" -Fc --section=post-data -f "$WORK/post.dump" -d "$(src_uri bench)"
  copy_one() { # side db TO|FROM table
    pgtide_psql "$1" "$2" -c "\\copy $4 $3 '$WORK/$(echo "$4" | md5sum | cut -c1-12).copy'"
  }
  export -f pgtide_psql copy_one; export PG_BIN PGTIDE_CLUSTERS_DIR PGTIDE_SOURCE_PORT PGTIDE_TARGET_PORT WORK
  local t0 t1 t2 t3
  t0=$(date +%s.%N)
  tr '\n' '\0' < "$list" | xargs -0 -P "$JOBS" -n1 bash -c 'copy_one source bench TO "$1"' _
  t1=$(date +%s.%N)
  tr '\n' '\0' < "$list" | xargs -0 -P "$JOBS" -n1 bash -c 'copy_one target physical_limit FROM "$1"' _
  t2=$(date +%s.%N)
  "$PG_BIN/pg_restore" -j "$JOBS" -d "$(dst_uri physical_limit)" "$WORK/post.dump"
  t3=$(date +%s.%N)
  local read load post
  read=$(echo "$t1 - $t0" | bc); load=$(echo "$t2 - $t1" | bc); post=$(echo "$t3 - $t2" | bc)
  LIMIT_ESTIMATE=$(echo "if ($read > $load) $read + $post else $load + $post" | bc)
  echo "$LIMIT_ESTIMATE" > "$WORK/limit-estimate"
  echo "physical limit: read $read s, load $load s, post-data $post s -> estimate $LIMIT_ESTIMATE s" | tee "$WORK/limit-detail" >&2
  rm -f "$WORK"/*.copy "$WORK/post.dump"
}
run physical_limit limit
if [ "${SECONDS_OF[physical_limit]}" != failed ]; then
  SECONDS_OF[physical_limit]=$(cat "$WORK/limit-estimate")
  VERDICT_OF[physical_limit]="$(cat "$WORK/limit-detail"); verify: ${VERDICT_OF[physical_limit]:0:200}"
fi

echo
echo "pgbench scale $SCALE, $JOBS jobs, split at $SPLIT, $(nproc) cores"
for name in pgtide pgtide_split pgtide_fast pgcopydb pgcopydb_split dump_restore physical_limit; do
  printf '%-16s %8s s   %s\n' "$name" "$(secs "${SECONDS_OF[$name]}")" "${VERDICT_OF[$name]}"
done
best_pgcopydb=$(best_of "${SECONDS_OF[pgcopydb]}" "${SECONDS_OF[pgcopydb_split]}")
echo "pgtide / best pgcopydb:      $(ratio "${SECONDS_OF[pgtide]}" "$best_pgcopydb")   (pgtide --split-tables-larger-than $SPLIT: $(ratio "${SECONDS_OF[pgtide_split]}" "$best_pgcopydb"))"
echo "pgtide --fast-restore / best pgcopydb: $(ratio "${SECONDS_OF[pgtide_fast]}" "$best_pgcopydb")"
echo "pgtide / dump-restore:       $(ratio "${SECONDS_OF[pgtide]}" "${SECONDS_OF[dump_restore]}")"
echo "pgtide / physical limit:     $(ratio "${SECONDS_OF[pgtide]}" "${SECONDS_OF[physical_limit]}")"
echo "pgtide plan estimate / measured: $(ratio "$PLAN_BENCH" "${SECONDS_OF[pgtide]}") (estimated $PLAN_BENCH s, measured $(secs "${SECONDS_OF[pgtide]}") s)"
echo "plan pgbench: estimated $PLAN_BENCH s, measured $(secs "${SECONDS_OF[pgtide]}") s, ratio $(ratio "$PLAN_BENCH" "${SECONDS_OF[pgtide]}")" >> "$WORK/summary"
echo "clone pgbench (scale $SCALE, $JOBS jobs): pgtide $(secs "${SECONDS_OF[pgtide]}") s (split $(secs "${SECONDS_OF[pgtide_split]}") s), best pgcopydb $(secs "$best_pgcopydb") s, dump-restore $(secs "${SECONDS_OF[dump_restore]}") s; pgtide/best pgcopydb $(ratio "${SECONDS_OF[pgtide]}" "$best_pgcopydb") (split $(ratio "${SECONDS_OF[pgtide_split]}" "$best_pgcopydb"), --fast-restore $(secs "${SECONDS_OF[pgtide_fast]}") s: $(ratio "${SECONDS_OF[pgtide_fast]}" "$best_pgcopydb")), pgtide/dump-restore $(ratio "${SECONDS_OF[pgtide]}" "${SECONDS_OF[dump_restore]}")" >> "$WORK/summary"
echo "step times of the pgtide run:"; sed -n '/^step/,/^$/p' "$WORK/pgtide.log"
echo "logs: $WORK"
echo
if [ "$TOAST_MB" -gt 0 ]; then toast_bench; fi
}

# The TOAST-heavy clone: rows of a 4 kB hex text, a jsonb of 64 hex strings and 4 kB of random
# bytes, all stored out of line (about 13.5 kB a row in the TOAST table: 75 rows a MB).
TOAST_MB=${PGTIDE_BENCH_TOAST_MB:-1000}
TOAST_SPLIT=${PGTIDE_BENCH_TOAST_SPLIT:-$SPLIT}
toast_bench() {
  local rows=$(( TOAST_MB * 75 ))
  echo "== source: toastbench, $rows rows of text + jsonb + bytea (~$TOAST_MB MB)" >&2
  pgtide_psql source postgres -c "CREATE DATABASE toastbench"
  pgtide_psql source toastbench -c "CREATE TABLE toast_docs (id int PRIMARY KEY, body text, meta jsonb, blob bytea)" \
    -c "INSERT INTO toast_docs
        SELECT g, h, jsonb_build_object('id', g, 'tags', (SELECT jsonb_agg(substr(h, 32 * i + 1, 32)) FROM generate_series(0, 63) i)),
               decode(h, 'hex') || decode(reverse(h), 'hex')
        FROM (SELECT g, (SELECT string_agg(md5(g::text || '-' || i::text), '') FROM generate_series(1, 128) i) AS h
              FROM generate_series(1, $rows) g) s" \
    -c "VACUUM ANALYZE toast_docs" -c "CHECKPOINT"
  local sizes
  sizes=$(pgtide_psql source toastbench -At -c "SELECT 'toastbench: table ' || pg_size_pretty(pg_total_relation_size('toast_docs')) || ', of which heap ' || pg_size_pretty(pg_relation_size('toast_docs')) || ', TOAST ' || pg_size_pretty(pg_total_relation_size(reltoastrelid)) FROM pg_class WHERE oid = 'toast_docs'::regclass")
  echo "$sizes" >&2
  CLONE_DB=toastbench
  local names=(toast_pgtide toast_pgtide_split toast_pgcopydb toast_pgcopydb_split)
  local plan_toast; plan_toast=$(plan_estimate toastbench || echo failed)
  echo "   pgtide plan estimates the pgtide clone at $plan_toast s" >&2
  run toast_pgtide "$PGTIDE" clone --source "$(src_uri toastbench)" --target "$(dst_uri toast_pgtide)" --dir "$WORK/toast-pgtide-dir" \
    --table-jobs "$JOBS" --index-jobs "$JOBS"
  if [ "${PGTIDE_BENCH_TOAST_KEEP:-0}" = 1 ]; then
    names+=(toast_pgtide_keep)
    run toast_pgtide_keep "$PGTIDE" clone --source "$(src_uri toastbench)" --target "$(dst_uri toast_pgtide_keep)" --dir "$WORK/toast-pgtide-keep-dir" \
      --table-jobs "$JOBS" --index-jobs "$JOBS" --toast-compression keep
  fi
  run toast_pgtide_split "$PGTIDE" clone --source "$(src_uri toastbench)" --target "$(dst_uri toast_pgtide_split)" --dir "$WORK/toast-pgtide-split-dir" \
    --table-jobs "$JOBS" --index-jobs "$JOBS" --split-tables-larger-than "$TOAST_SPLIT"
  run toast_pgcopydb pgcopydb clone --source "$(src_uri toastbench)" --target "$(dst_uri toast_pgcopydb)" --dir "$WORK/toast-pgcopydb-dir" \
    --table-jobs "$JOBS" --index-jobs "$JOBS"
  run toast_pgcopydb_split pgcopydb clone --source "$(src_uri toastbench)" --target "$(dst_uri toast_pgcopydb_split)" --dir "$WORK/toast-pgcopydb-split-dir" \
    --table-jobs "$JOBS" --index-jobs "$JOBS" --split-tables-larger-than "$TOAST_SPLIT"
  CLONE_DB=bench
  local name
  for name in "${names[@]}"; do   # the copies are verified: give their disk space back
    pgtide_psql target postgres -c "DROP DATABASE IF EXISTS \"$name\" WITH (FORCE)"
  done
  local best; best=$(best_of "${SECONDS_OF[toast_pgcopydb]}" "${SECONDS_OF[toast_pgcopydb_split]}")
  echo
  echo "TOAST-heavy: $sizes; $JOBS jobs, split at $TOAST_SPLIT"
  for name in "${names[@]}"; do
    printf '%-22s %8s s   %s\n' "$name" "$(secs "${SECONDS_OF[$name]}")" "${VERDICT_OF[$name]}"
  done
  echo "pgtide / best pgcopydb:      $(ratio "${SECONDS_OF[toast_pgtide]}" "$best")   (pgtide --split-tables-larger-than $TOAST_SPLIT: $(ratio "${SECONDS_OF[toast_pgtide_split]}" "$best"))"
  echo "pgtide plan estimate / measured: $(ratio "$plan_toast" "${SECONDS_OF[toast_pgtide]}") (estimated $plan_toast s, measured $(secs "${SECONDS_OF[toast_pgtide]}") s)"
  echo "plan TOAST-heavy: estimated $plan_toast s, measured $(secs "${SECONDS_OF[toast_pgtide]}") s, ratio $(ratio "$plan_toast" "${SECONDS_OF[toast_pgtide]}")" >> "$WORK/summary"
  echo
  echo "clone TOAST-heavy (~$TOAST_MB MB, $JOBS jobs): pgtide $(secs "${SECONDS_OF[toast_pgtide]}") s (split $(secs "${SECONDS_OF[toast_pgtide_split]}") s), best pgcopydb $(secs "$best") s; pgtide/best pgcopydb $(ratio "${SECONDS_OF[toast_pgtide]}" "$best") (split $(ratio "${SECONDS_OF[toast_pgtide_split]}" "$best"))" >> "$WORK/summary"
}

# secs S: S with one decimal, or as it is (failed); best_of A B: the smaller number, or the one
# that is a number, or failed; ratio A B: A / B, or n/a when either is not a number.
is_num() { [[ $1 =~ ^[0-9]*\.?[0-9]+$ ]]; }
secs() { if is_num "$1"; then printf '%.1f' "$1"; else printf '%s' "$1"; fi; }
best_of() {
  if is_num "$1" && is_num "$2"; then echo "if ($1 < $2) $1 else $2" | bc
  elif is_num "$1"; then echo "$1"; elif is_num "$2"; then echo "$2"; else echo failed; fi
}
ratio() { if is_num "$1" && is_num "$2"; then echo "scale=2; $1 / $2" | bc | sed 's/^\./0./'; else echo n/a; fi; }
[ "$ONLY" = apply ] || clone_bench
source scripts/bench-apply.sh
[ "$ONLY" = clone ] || apply_bench "${PGTIDE_BENCH_APPLY_SCALE:-10}" "${PGTIDE_BENCH_LOAD_SECONDS:-30}"
echo "logs: $WORK"
echo
# The spool's write throughput (group commit through the real SpoolWriter).
cargo bench --quiet --bench spool 2>/dev/null | grep -E '^spool' || echo "spool bench: no result (cargo bench --bench spool failed)"
echo
echo "== summary ($(nproc) cores; logs: $WORK)"
cat "$WORK/summary"
