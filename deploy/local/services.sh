#!/usr/bin/env bash
# The four services (and the Cloud Foundry simulator) as background processes of the local stack.
# Logs go to $LOCAL_DIR/logs/<name>.log (JSON lines), pids to $LOCAL_DIR/run/<name>.pid.
#   services.sh start [NAME...] | stop [NAME...] | status | wait
set -euo pipefail
source "$(dirname "$0")/common.sh"

BILLING="$ROOT/.venv/bin/billing"
RUN="$LOCAL_DIR/run"
LOGS="$LOCAL_DIR/logs"
ALL=(sim collector pricer ledger api)
declare -A PORT=([sim]=8090 [api]=8080 [collector]=8081 [pricer]=8082 [ledger]=8083)

ready() { curl -fs -o /dev/null --max-time 2 "http://127.0.0.1:${PORT[$1]}/$([ "$1" = sim ] && echo .well-known/openid-configuration || echo readyz)"; }

start_one() {
  local name="$1" pidf="$RUN/$1.pid"
  if pid_alive "$pidf"; then log "$name already running (pid $(cat "$pidf"))"; return 0; fi
  mkdir -p "$RUN" "$LOGS"
  local args=()
  # The simulator's world comes from SIM_ARGS (the Makefile sets the demo's).
  # shellcheck disable=SC2206
  [ "$name" = sim ] && args=(${SIM_ARGS:-})
  (cd "$ROOT" && exec nohup "$BILLING" "$name" "${args[@]}" >>"$LOGS/$name.log" 2>&1 </dev/null) &
  echo $! >"$pidf"
}

wait_ready() {
  local name="$1" i
  for ((i = 0; i < 600; i++)); do
    ready "$name" && return 0
    pid_alive "$RUN/$name.pid" || { tail -n 20 "$LOGS/$name.log" >&2; die "$name exited during start (log: $LOGS/$name.log)"; }
    sleep 0.1
  done
  tail -n 20 "$LOGS/$name.log" >&2; die "$name was not ready within 60 s"
}

names() { if [ $# -gt 0 ]; then echo "$@"; else echo "${ALL[@]}"; fi; }

case "${1:-}" in
  start)
    shift
    for n in $(names "$@"); do start_one "$n"; done
    for n in $(names "$@"); do wait_ready "$n"; log "$n ready on http://127.0.0.1:${PORT[$n]}"; done ;;
  stop)
    shift
    # Reverse order: the api first, the simulator last.
    for n in $(names "$@" | tr ' ' '\n' | tac); do stop_pid "$RUN/$n.pid" "$n" 40; done ;;
  status)
    for n in "${ALL[@]}"; do
      if pid_alive "$RUN/$n.pid"; then s="running (pid $(cat "$RUN/$n.pid"))"; ready "$n" && s="$s, ready" || s="$s, not ready"; else s=stopped; fi
      printf '%-10s %-45s http://127.0.0.1:%s\n' "$n" "$s" "${PORT[$n]}"
    done ;;
  *) echo "usage: $0 start [NAME...]|stop [NAME...]|status" >&2; exit 2 ;;
esac
