# Shared settings of the local stack scripts (sourced, not run).
# Everything the stack writes lives under $BILLING_LOCAL_DIR (default: <checkout>/.local); `make clean` removes it.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
LOCAL_DIR="${BILLING_LOCAL_DIR:-$ROOT/.local}"
PY="${BILLING_PYTHON:-$ROOT/.venv/bin/python}"
PG_PORT="${PG_PORT:-5433}"
KAFKA_PORT="${KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-9093}"

log() { printf '%s %s\n' "[$(basename "$0" .sh)]" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Run a command as root, with sudo when we are not root.
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

APT_UPDATED=""
apt_install() {
  [ -n "$APT_UPDATED" ] || { as_root apt-get update -qq >/dev/null; APT_UPDATED=1; }
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

# pid_alive FILE: true when FILE names a running process (a stale file is removed).
pid_alive() {
  local f="$1" pid
  [ -f "$f" ] || return 1
  pid="$(cat "$f" 2>/dev/null)"
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then return 0; fi
  rm -f "$f"; return 1
}

# stop_pid FILE NAME [SECONDS]: SIGTERM, wait, then SIGKILL; removes FILE.
stop_pid() {
  local f="$1" name="$2" wait_s="${3:-30}" pid i
  pid_alive "$f" || { log "$name is not running"; return 0; }
  pid="$(cat "$f")"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < wait_s * 10; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then log "$name did not stop in ${wait_s}s; killing"; kill -KILL "$pid" 2>/dev/null || true; fi
  rm -f "$f"; log "$name stopped"
}

# wait_port PORT SECONDS: until something accepts TCP connections on 127.0.0.1:PORT.
wait_port() {
  local port="$1" secs="$2" i
  for ((i = 0; i < secs * 10; i++)); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}
