#!/usr/bin/env bash
# Throwaway PostgreSQL clusters for tests, the demo and the benchmark. Source this file, then:
#   pgtide_install_deps      apt packages (server, contrib, wal2json, pgcopydb) if missing
#   pgtide_start_clusters    initdb + start a source (wal_level=logical) and a target in a temp
#                            dir, as the postgres OS user; exports PGTIDE_TEST_SOURCE/_TARGET
#   pgtide_stop_clusters     stop both and remove the temp dir
#   pgtide_start_version_clusters MAJOR…
#                            one more cluster per major (wal_level=logical, so it serves as a
#                            source and as a target), server binaries from install-pg.sh;
#                            exports PGTIDE_TEST_PG<major> (its admin URI), PGTIDE_PG<major>_PORT,
#                            PGTIDE_PG<major>_BIN; call after pgtide_start_clusters
# Settings: PG_MAJOR (15); PGTIDE_CLUSTER_TUNING=test (default: fsync off, for speed) or bench
# (PostgreSQL's defaults, durable, as the benchmark's reference figures were taken);
# PGTIDE_KEEP_CLUSTERS=1 keeps the data after stop.

PG_MAJOR=${PG_MAJOR:-15}
PG_BIN=/usr/lib/postgresql/$PG_MAJOR/bin
source "$(dirname "${BASH_SOURCE[0]}")/install-pg.sh"
PGTIDE_VERSION_CLUSTERS=()

pgtide_install_deps() {
  local missing=()
  [ -x "$PG_BIN/initdb" ] || missing+=("postgresql-$PG_MAJOR")
  [ -f "/usr/share/postgresql/$PG_MAJOR/extension/hstore.control" ] || missing+=("postgresql-contrib-$PG_MAJOR" "postgresql-contrib")
  [ -f "/usr/lib/postgresql/$PG_MAJOR/lib/wal2json.so" ] || missing+=("postgresql-$PG_MAJOR-wal2json")
  command -v pgcopydb >/dev/null 2>&1 || missing+=("pgcopydb")
  command -v npm >/dev/null 2>&1 || missing+=("npm")
  command -v openssl >/dev/null 2>&1 || missing+=("openssl")
  [ -x /usr/sbin/pgbouncer ] || missing+=("pgbouncer")
  command -v chromium >/dev/null 2>&1 || missing+=("chromium")
  python3 -c "import yaml" 2>/dev/null || missing+=("python3-yaml")
  command -v pgbench >/dev/null 2>&1 || [ -x "$PG_BIN/pgbench" ] || missing+=("postgresql-client-$PG_MAJOR")
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    # postgresql-contrib is a virtual/meta package on some releases; install what exists.
    apt-get install -y -qq "${missing[@]}" >&2 || apt-get install -y -qq "${missing[@]/postgresql-contrib/}" >&2
  fi
  id postgres >/dev/null 2>&1 || { echo "the postgres OS user is missing after install" >&2; return 1; }
}

_pgtide_free_port() {
  local port
  while :; do
    port=$(( 20000 + RANDOM % 20000 ))
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || { echo "$port"; return; }
  done
}

_pgtide_as_postgres() { runuser -u postgres -- "$@"; }

pgtide_start_clusters() {
  PGTIDE_CLUSTERS_DIR=$(mktemp -d /tmp/pgtide-clusters.XXXXXX)
  chmod 755 "$PGTIDE_CLUSTERS_DIR"
  chown postgres: "$PGTIDE_CLUSTERS_DIR"
  export PGTIDE_CLUSTERS_DIR PGTIDE_PG_BIN=$PG_BIN
  PGTIDE_TEST_PASSWORD=${PGTIDE_TEST_PASSWORD:-"tide-$RANDOM-$RANDOM"}
  local pwfile="$PGTIDE_CLUSTERS_DIR/pwfile"
  printf '%s\n' "$PGTIDE_TEST_PASSWORD" > "$pwfile"
  chown postgres: "$pwfile"; chmod 600 "$pwfile"
  local tuning=${PGTIDE_CLUSTER_TUNING:-test}
  # A throwaway CA and a server certificate for "localhost" (no IP address in it, so that
  # verify-full against 127.0.0.1 must fail): the source serves TLS, the target does not.
  local tls="$PGTIDE_CLUSTERS_DIR/tls"
  mkdir -p "$tls"
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=pgtide test CA" \
    -keyout "$tls/ca.key" -out "$tls/ca.crt" >/dev/null 2>&1
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout "$tls/server.key" \
    -out "$tls/server.csr" >/dev/null 2>&1
  printf 'subjectAltName=DNS:localhost\n' > "$tls/san.ext"
  openssl x509 -req -in "$tls/server.csr" -CA "$tls/ca.crt" -CAkey "$tls/ca.key" -CAcreateserial \
    -days 2 -extfile "$tls/san.ext" -out "$tls/server.crt" >/dev/null 2>&1
  # A client certificate for the role pgtide_cert (certificate authentication, TLS only).
  openssl req -newkey rsa:2048 -nodes -subj "/CN=pgtide_cert" -keyout "$tls/client.key" \
    -out "$tls/client.csr" >/dev/null 2>&1
  printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' > "$tls/client.ext"
  openssl x509 -req -in "$tls/client.csr" -CA "$tls/ca.crt" -CAkey "$tls/ca.key" -CAcreateserial \
    -days 2 -extfile "$tls/client.ext" -out "$tls/client.crt" >/dev/null 2>&1
  chown -R postgres: "$tls"; chmod 600 "$tls/server.key"; chmod 644 "$tls/ca.crt"
  # The client key belongs to whoever runs the tests (libpq and pgtide refuse a key others read).
  chown "$(id -u):$(id -g)" "$tls/client.key" "$tls/client.crt"; chmod 600 "$tls/client.key"
  export PGTIDE_TEST_CA="$tls/ca.crt" PGTIDE_TEST_CLIENT_CERT="$tls/client.crt" PGTIDE_TEST_CLIENT_KEY="$tls/client.key"
  for role in source target; do
    local data="$PGTIDE_CLUSTERS_DIR/$role"
    local port; port=$(_pgtide_free_port)
    _pgtide_as_postgres "$PG_BIN/initdb" -D "$data" -U postgres --pwfile="$pwfile" \
      --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >/dev/null
    {
      echo "port = $port"
      echo "listen_addresses = '127.0.0.1'"
      echo "unix_socket_directories = '$PGTIDE_CLUSTERS_DIR'"
      echo "max_connections = 200"
      # The fuzzer runs native subscriptions (an apply worker and table-sync workers each,
      # a slot each on the source) next to pgtide's slots.
      echo "max_replication_slots = 20"
      echo "max_wal_senders = 20"
      echo "max_worker_processes = 16"
      echo "max_logical_replication_workers = 8"
      echo "wal_level = $([ "$role" = source ] && echo logical || echo replica)"
      if [ "$role" = source ]; then
        # Newer minor releases only load output plugins listed here (pgoutput is built in).
        local plugins
        plugins=$("$PG_BIN/postgres" --describe-config 2>/dev/null | awk -F'\t' '$1 == "output_plugin_libraries" {print $5}')
        [ -n "$plugins" ] && echo "output_plugin_libraries = '$plugins, wal2json'"
        echo "ssl = on"
        echo "ssl_cert_file = '$tls/server.crt'"
        echo "ssl_key_file = '$tls/server.key'"
        echo "ssl_ca_file = '$tls/ca.crt'"
      fi
      if [ "$tuning" = test ]; then
        echo "fsync = off"
        echo "synchronous_commit = off"
        echo "full_page_writes = off"
      fi
    } >> "$data/postgresql.conf"
    # The database tls_only accepts only TLS connections over TCP (the TLS tests use it).
    # Two roles the authentication tests log in as with MD5 and cleartext passwords.
    if [ "$role" = source ]; then
      sed -i '/^# TYPE/a hostnossl  tls_only  all  all  reject\nhost  all  pgtide_md5  all  md5\nhost  replication  pgtide_md5  all  md5\nhost  all  pgtide_plain  all  password\nhost  replication  pgtide_plain  all  password\nhostssl  all  pgtide_cert  all  cert\nhostssl  replication  pgtide_cert  all  cert' "$data/pg_hba.conf"
    fi
    _pgtide_as_postgres "$PG_BIN/pg_ctl" -D "$data" -l "$PGTIDE_CLUSTERS_DIR/$role.log" -w start >/dev/null
    local uri="postgres://postgres:$PGTIDE_TEST_PASSWORD@127.0.0.1:$port/postgres"
    if [ "$role" = source ]; then export PGTIDE_TEST_SOURCE=$uri PGTIDE_SOURCE_PORT=$port
    else export PGTIDE_TEST_TARGET=$uri PGTIDE_TARGET_PORT=$port; fi
  done
  export PGTIDE_TEST_PASSWORD
  echo "clusters up in $PGTIDE_CLUSTERS_DIR: source port $PGTIDE_SOURCE_PORT, target port $PGTIDE_TARGET_PORT" >&2
}

pgtide_stop_clusters() {
  [ -n "${PGTIDE_CLUSTERS_DIR:-}" ] && [ -d "$PGTIDE_CLUSTERS_DIR" ] || return 0
  for role in source target; do
    [ -d "$PGTIDE_CLUSTERS_DIR/$role" ] && _pgtide_as_postgres "$PG_BIN/pg_ctl" -D "$PGTIDE_CLUSTERS_DIR/$role" -m immediate -w stop >/dev/null 2>&1
  done
  local major
  for major in "${PGTIDE_VERSION_CLUSTERS[@]}"; do
    _pgtide_as_postgres "$(pgtide_server_bin "$major")/pg_ctl" -D "$PGTIDE_CLUSTERS_DIR/pg$major" -m immediate -w stop >/dev/null 2>&1
  done
  if [ "${PGTIDE_KEEP_CLUSTERS:-0}" != 1 ]; then rm -rf "$PGTIDE_CLUSTERS_DIR"; fi
}

pgtide_start_version_clusters() {
  [ -n "${PGTIDE_CLUSTERS_DIR:-}" ] || { echo "pgtide_start_clusters first" >&2; return 1; }
  pgtide_install_pg "$@" || return 1
  local major
  for major in "$@"; do
    local bin; bin=$(pgtide_server_bin "$major")
    local data="$PGTIDE_CLUSTERS_DIR/pg$major"
    local port; port=$(_pgtide_free_port)
    _pgtide_as_postgres "$bin/initdb" -D "$data" -U postgres --pwfile="$PGTIDE_CLUSTERS_DIR/pwfile" \
      --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >/dev/null || return 1
    {
      echo "port = $port"
      echo "listen_addresses = '127.0.0.1'"
      echo "unix_socket_directories = '$PGTIDE_CLUSTERS_DIR'"
      echo "password_encryption = 'scram-sha-256'"
      echo "max_connections = 100"
      echo "max_replication_slots = 10"
      echo "max_wal_senders = 10"
      echo "wal_level = logical"
      echo "shared_buffers = 32MB"
      if [ "${PGTIDE_CLUSTER_TUNING:-test}" = test ]; then
        echo "fsync = off"
        echo "synchronous_commit = off"
        echo "full_page_writes = off"
      fi
    } >> "$data/postgresql.conf"
    _pgtide_as_postgres "$bin/pg_ctl" -D "$data" -l "$PGTIDE_CLUSTERS_DIR/pg$major.log" -w start >/dev/null || {
      cat "$PGTIDE_CLUSTERS_DIR/pg$major.log" >&2; return 1; }
    PGTIDE_VERSION_CLUSTERS+=("$major")
    export "PGTIDE_TEST_PG$major=postgres://postgres:$PGTIDE_TEST_PASSWORD@127.0.0.1:$port/postgres"
    export "PGTIDE_PG${major}_PORT=$port" "PGTIDE_PG${major}_BIN=$bin"
    echo "PostgreSQL $major up: port $port" >&2
  done
}

# psql against a cluster as the superuser over the socket: pgtide_psql source|target DB [psql args…]
pgtide_psql() {
  local role=$1 db=$2; shift 2
  local port; [ "$role" = source ] && port=$PGTIDE_SOURCE_PORT || port=$PGTIDE_TARGET_PORT
  "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PGTIDE_CLUSTERS_DIR" -p "$port" -U postgres -d "$db" "$@"
}
