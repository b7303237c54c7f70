#!/usr/bin/env bash
# PostgreSQL 15 for local development, tests and CI: Debian's package, a cluster in $LOCAL_DIR/pg on
# 127.0.0.1:$PG_PORT, run as a non-root user (initdb refuses root). One database `billing` with one login
# role and one schema per service; each role has rights on its own schema only.
#   pg.sh install|start|stop|status|psql|clean
set -euo pipefail
source "$(dirname "$0")/common.sh"

PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
PG_DIR="$LOCAL_DIR/pg"
# initdb refuses to run as root, so as root the cluster belongs to Debian's `postgres` user.
if [ "$(id -u)" -eq 0 ]; then
  RUN_AS=(runuser -u postgres --)
  # When the checkout lies where `postgres` cannot reach (under /root, say), keep the cluster under
  # postgres's home instead, one per checkout.
  mkdir -p "$LOCAL_DIR"
  if ! runuser -u postgres -- test -x "$LOCAL_DIR"; then
    PG_DIR="/var/lib/postgresql/billing-$(printf '%s' "$ROOT" | md5sum | cut -c1-8)"
  fi
else
  RUN_AS=()
fi
DATA="$PG_DIR/data"
RUN="$PG_DIR/run"
PG_LOG="$PG_DIR/postgres.log"
ADMIN_USER=billing_admin
ADMIN_PASSWORD="${PG_ADMIN_PASSWORD:-billing_admin}"


install() {
  if [ ! -x "$PG_BIN/initdb" ]; then
    log "installing PostgreSQL 15 from Debian's packages"
    apt_install postgresql-15 postgresql-client-15
  fi
  [ -x "$PG_BIN/initdb" ] || die "PostgreSQL 15 is not installed at $PG_BIN"
}

running() { [ -f "$DATA/postmaster.pid" ] && "${RUN_AS[@]}" "$PG_BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; }

init_cluster() {
  [ -f "$DATA/PG_VERSION" ] && return 0
  log "creating a cluster in $DATA"
  mkdir -p "$DATA" "$RUN"
  [ "$(id -u)" -eq 0 ] && chown -R postgres:postgres "$PG_DIR"
  local pw; pw="$(mktemp)"; printf '%s\n' "$ADMIN_PASSWORD" >"$pw"; chmod 644 "$pw"
  "${RUN_AS[@]}" "$PG_BIN/initdb" -D "$DATA" -U "$ADMIN_USER" --pwfile="$pw" -E UTF8 --locale=C.UTF-8 \
    --auth-local=scram-sha-256 --auth-host=scram-sha-256 >/dev/null
  rm -f "$pw"
  cat >>"$DATA/postgresql.conf" <<CONF
# billing: local settings (deploy/local/pg.sh)
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$RUN'
timezone = 'UTC'
max_connections = 200
shared_buffers = 512MB
wal_compression = on
max_wal_size = 4GB
checkpoint_timeout = 15min
log_min_messages = warning
log_line_prefix = '%m [%p] %u@%d '
CONF
}

start() {
  install
  init_cluster
  mkdir -p "$RUN"; [ "$(id -u)" -eq 0 ] && chown postgres:postgres "$RUN"
  if running; then log "PostgreSQL already running on 127.0.0.1:$PG_PORT"; else
    # pg_ctl itself ignores a stale postmaster.pid whose process is gone.
    "${RUN_AS[@]}" "$PG_BIN/pg_ctl" -D "$DATA" -l "$PG_LOG" -w -t 60 start >/dev/null || { tail -n 20 "$PG_LOG" >&2; die "PostgreSQL did not start"; }
    log "PostgreSQL started on 127.0.0.1:$PG_PORT"
  fi
  bootstrap billing
}

# bootstrap DB: database, roles and schemas, idempotently.
bootstrap() {
  local db="$1"
  PGPASSWORD="$ADMIN_PASSWORD" psql -q -h 127.0.0.1 -p "$PG_PORT" -U "$ADMIN_USER" -d postgres -v ON_ERROR_STOP=1 \
    -tc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1 ||
    PGPASSWORD="$ADMIN_PASSWORD" psql -q -h 127.0.0.1 -p "$PG_PORT" -U "$ADMIN_USER" -d postgres -c "CREATE DATABASE $db"
  PGOPTIONS="-c client_min_messages=warning" PGPASSWORD="$ADMIN_PASSWORD" psql -q -h 127.0.0.1 -p "$PG_PORT" -U "$ADMIN_USER" -d "$db" -v ON_ERROR_STOP=1 \
    -f "$ROOT/deploy/local/schemas.sql" >/dev/null
}

stop() {
  if running; then "${RUN_AS[@]}" "$PG_BIN/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null; log "PostgreSQL stopped"; else log "PostgreSQL is not running"; fi
}

status() { if running; then echo "postgres: running on 127.0.0.1:$PG_PORT"; else echo "postgres: stopped"; return 1; fi; }

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  bootstrap) bootstrap "${2:?database name}" ;;
  psql) shift; PGPASSWORD="$ADMIN_PASSWORD" exec psql -h 127.0.0.1 -p "$PG_PORT" -U "$ADMIN_USER" -d billing "$@" ;;
  clean) stop; rm -rf "$PG_DIR"; log "removed $PG_DIR" ;;
  *) echo "usage: $0 install|start|stop|status|bootstrap DB|psql|clean" >&2; exit 2 ;;
esac
