#!/usr/bin/env bash
# Installs the helm CLI into .servers/bin for the deploy/ manifest tests, built from
# the Go module proxy (helm.sh/helm/v3) since no other download is possible here.
# Idempotent: a no-op when the pinned version is already there. The first build on a
# fresh machine compiles helm and its Kubernetes dependencies (several CPU-minutes);
# Go's build and module caches make later builds fast.
#
# Usage: test/k8s/install-helm.sh   (prints the path of the binary on its last line)
set -euo pipefail
cd "$(dirname "$0")/../.."
SERVERS_DIR="${SERVERS_DIR:-$PWD/.servers}"
VERSION=v3.22.0
BIN="$SERVERS_DIR/bin/helm"
STAMP="$SERVERS_DIR/bin/helm.version"

if [ -x "$BIN" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$VERSION" ]; then
  echo "$BIN"
  exit 0
fi
mkdir -p "$SERVERS_DIR/bin"
start=$SECONDS
# -mod=mod: resolve helm's own go.mod, not this repository's; the version ldflag makes
# `helm version` tell the truth (helm reads it from internal/version).
GOBIN="$SERVERS_DIR/bin" GOFLAGS=-mod=mod go install -trimpath \
  -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$VERSION" \
  "helm.sh/helm/v3/cmd/helm@$VERSION" >&2
echo "$VERSION" >"$STAMP"
echo "helm $VERSION built in $((SECONDS - start))s" >&2
echo "$BIN"
