#!/usr/bin/env bash
# The differential fuzzer (tests/fuzz.rs): N seeds (default 300) from FIRST (default 1), each a
# random schema, random source settings and random DML replicated by `clone --follow` and by a
# native subscription into two target databases that must end identical to the source. Starts
# its own clusters like scripts/test.sh. A failing seed prints the seed, the SQL and the first
# differing rows, and leaves them in target/fuzz-failures/seed-N.sql; rerun one with
# `scripts/fuzz.sh 1 N`, or a hand-minimised script with PGTIDE_FUZZ_REPRO=file.sql.
# Usage: scripts/fuzz.sh [SEEDS] [FIRST_SEED]   (PGTIDE_FUZZ_JOBS seeds at a time, default 3;
# PGTIDE_FUZZ_KNOWN_BUGS=on or PGTIDE_FUZZ_ENABLE=name,… switch on what KNOWN_BUGS keeps off)
set -euo pipefail
cd "$(dirname "$0")/.."
export PGTIDE_FUZZ_SEEDS=${1:-300} PGTIDE_FUZZ_FIRST_SEED=${2:-1} RUST_TEST_NOCAPTURE=1
exec scripts/test.sh --test fuzz
