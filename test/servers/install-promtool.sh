#!/usr/bin/env bash
# Installs promtool (Prometheus's rule checker) into .servers/bin for
# test/monitoring/promtool.test.ts. Idempotent: a no-op when the pinned version is there.
#
# promtool comes from Debian's `prometheus` package: `apt-get download` fetches the
# .deb as any user and `dpkg-deb -x` unpacks it under .servers/, so nothing is
# installed system-wide and no Prometheus server is started. Without apt (another
# distribution), it is built from the Go module proxy instead (several CPU-minutes).
# A promtool already on PATH is used as it is.
#
# Usage: test/servers/install-promtool.sh   (prints the path of the binary on its last line)
set -euo pipefail
cd "$(dirname "$0")/../.."
SERVERS_DIR="${SERVERS_DIR:-$PWD/.servers}"
BIN="$SERVERS_DIR/bin/promtool"
STAMP="$SERVERS_DIR/bin/promtool.version"
# Debian 12's package; the Go fallback builds the same release line.
DEB_VERSION=2.42.0+ds-5+deb12u1
GO_MODULE=github.com/prometheus/prometheus/cmd/promtool
GO_VERSION=v0.42.0

if [ -n "${PROMTOOL:-}" ] && [ -x "$PROMTOOL" ]; then
  echo "$PROMTOOL"
  exit 0
fi
if [ -x "$BIN" ] && [ -s "$STAMP" ]; then
  echo "$BIN"
  exit 0
fi
if command -v promtool >/dev/null 2>&1; then
  command -v promtool
  exit 0
fi
mkdir -p "$SERVERS_DIR/bin"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if command -v apt-get >/dev/null 2>&1 && command -v dpkg-deb >/dev/null 2>&1; then
  # The exact version first; a newer Debian release carries another one.
  (cd "$work" && { apt-get download "prometheus=$DEB_VERSION" || apt-get download prometheus; }) >&2
  dpkg-deb -x "$work"/prometheus_*.deb "$work/root"
  install -m 0755 "$work/root/usr/bin/promtool" "$BIN"
  basename "$work"/prometheus_*.deb .deb >"$STAMP"
else
  GOBIN="$SERVERS_DIR/bin" GOFLAGS=-mod=mod go install -trimpath "$GO_MODULE@$GO_VERSION" >&2
  echo "$GO_MODULE@$GO_VERSION" >"$STAMP"
fi
"$BIN" --version >&2
echo "$BIN"
