#!/usr/bin/env bash
# kustomize for rendering deploy/k8s (the tests do; so can you), pinned, built from its Go module into
# $LOCAL_DIR/bin once. Built with the Go toolchain of the machine because no Debian or PyPI package ships a
# current kustomize (Debian's kubernetes-client embeds kustomize 2.0, too old for these overlays).
#   kustomize.sh install | kustomize.sh build DIR
set -euo pipefail
source "$(dirname "$0")/../local/common.sh"

VERSION="v5.7.1"
BIN="$LOCAL_DIR/bin/kustomize"

install() {
  if [ -x "$BIN" ] && "$BIN" version 2>/dev/null | grep -q "${VERSION#v}"; then return 0; fi
  command -v go >/dev/null || die "Go is needed to build kustomize $VERSION (the machine's toolchain)"
  log "building kustomize $VERSION into $LOCAL_DIR/bin (once)"
  mkdir -p "$LOCAL_DIR/bin"
  GOBIN="$LOCAL_DIR/bin" GOFLAGS=-mod=mod go install "sigs.k8s.io/kustomize/kustomize/v5@$VERSION" >/dev/null
}

case "${1:-}" in
  install) install ;;
  build) install; shift; exec "$BIN" build "$@" ;;
  *) echo "usage: $0 install|build DIR" >&2; exit 2 ;;
esac
