#!/usr/bin/env bash
# The headless browser of the dashboard's end-to-end tests: Debian's `chromium` package, driven by
# Playwright's Python package through its executable path (Playwright never downloads a browser here).
#   browser.sh install|path|status
set -euo pipefail
source "$(dirname "$0")/common.sh"

CHROMIUM="${BILLING_CHROMIUM:-/usr/bin/chromium}"

install() {
  if [ ! -x "$CHROMIUM" ]; then
    log "installing Chromium from Debian's packages (for the dashboard's browser tests)"
    apt_install chromium
  fi
  [ -x "$CHROMIUM" ] || die "Chromium is not installed at $CHROMIUM"
}

case "${1:-}" in
  install) install ;;
  path) printf '%s\n' "$CHROMIUM" ;;
  status)
    if [ -x "$CHROMIUM" ]; then log "$("$CHROMIUM" --version 2>/dev/null || echo chromium) at $CHROMIUM"
    else log "Chromium is not installed (run: make install)"; exit 1; fi ;;
  *) echo "usage: $0 install|path|status" >&2; exit 2 ;;
esac
