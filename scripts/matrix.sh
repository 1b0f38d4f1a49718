#!/usr/bin/env bash
# The whole version matrix, on demand: every source major 12–18 into every target of the same
# or a newer major with pgoutput, and wal2json from the sources that have it (Debian's 15), one
# cell at a time through tests/versions.rs `matrix_cell` (clone --follow under traffic with the
# hard-case workload, cutover, every table compared by count and content). Prints the grid;
# a failed cell's output is kept in $PGTIDE_MATRIX_LOGS (default: a temp dir).
# Usage: scripts/matrix.sh [SOURCE_MAJOR…]   (default: 12 13 14 15 16 17 18)
# Exit status: 0 when every cell passed.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/clusters.sh
majors=(12 13 14 15 16 17 18)
sources=("$@"); [ ${#sources[@]} -gt 0 ] || sources=("${majors[@]}")
pgtide_install_deps
trap pgtide_stop_clusters EXIT
pgtide_start_clusters
others=(); for m in "${majors[@]}"; do [ "$m" = 15 ] || others+=("$m"); done
pgtide_start_version_clusters "${others[@]}"
export PGTIDE_TEST_CLIENT18_BIN; PGTIDE_TEST_CLIENT18_BIN=$(pgtide_client_bin)
cargo build --features failpoints --quiet
cargo test --features failpoints --test versions --no-run --quiet 2>/dev/null
logs=${PGTIDE_MATRIX_LOGS:-$(mktemp -d /tmp/pgtide-matrix.XXXXXX)}
mkdir -p "$logs"

declare -A result
failed=0
run_cell() {
  local cell=$1 started=$SECONDS
  if PGTIDE_MATRIX_CELL=$cell cargo test --features failpoints --quiet --test versions matrix_cell \
       >"$logs/${cell//:/_}.log" 2>&1; then
    result[$cell]="ok $((SECONDS - started))s"
    rm -f "$logs/${cell//:/_}.log"
  else
    result[$cell]="FAIL"
    failed=$((failed + 1))
  fi
  echo "cell $cell: ${result[$cell]}" >&2
}
for s in "${sources[@]}"; do
  for t in "${majors[@]}"; do
    [ "$t" -ge "$s" ] && run_cell "$s:$t"
  done
  if [ "$s" = 15 ]; then
    for t in "${majors[@]}"; do [ "$t" -ge 15 ] && run_cell "15:$t:wal2json"; done
  fi
done

printf '\n%-18s' "source \\ target"
for t in "${majors[@]}"; do printf '%-10s' "$t"; done
printf '\n'
for s in "${sources[@]}"; do
  rows=("$s:pgoutput")
  [ "$s" = 15 ] && rows+=("$s:wal2json")
  for row in "${rows[@]}"; do
    printf '%-18s' "$s ${row#*:}"
    for t in "${majors[@]}"; do
      if [ "$t" -lt "$s" ]; then printf '%-10s' "-"; continue; fi
      key="$s:$t"; [ "${row#*:}" = wal2json ] && key="$s:$t:wal2json"
      printf '%-10s' "${result[$key]%% *}"
    done
    printf '\n'
  done
done
echo "failed cells: $failed (logs of failures in $logs)"
[ "$failed" = 0 ]
