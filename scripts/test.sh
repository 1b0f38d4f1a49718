#!/usr/bin/env bash
# Runs the whole test suite against real PostgreSQL servers: installs what is missing, starts a
# source (wal_level=logical) and a target cluster in a temp dir, runs cargo test, and stops the
# clusters whatever the result.  Usage: scripts/test.sh [cargo test args…]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/clusters.sh
pgtide_install_deps
trap pgtide_stop_clusters EXIT
pgtide_start_clusters
cargo build --features failpoints --quiet
cargo test --features failpoints "$@" -- --test-threads="${PGTIDE_TEST_THREADS:-3}"
