#!/usr/bin/env bash
# Finds a peer Kubernetes KMS plugin binary (a third-party program, not part of
# Trousseau) and prints its path, cached as .servers/bin/peers/<name>. Used by the
# kms-plugin backend's test servers and by the bench's peers scenario.
#
# Peers:
#   aws-encryption-provider  kubernetes-sigs/aws-encryption-provider (Apache-2.0)
#   vault-kubernetes-kms     FalcoSuessgott/vault-kubernetes-kms (MIT)
#
# Where the binary comes from, first found wins:
#   1. an environment variable: AWS_ENCRYPTION_PROVIDER_BIN or VAULT_KUBERNETES_KMS_BIN;
#   2. ../shared/test-servers/peers/<name> next to the repository, when that folder
#      exists (prebuilt from the projects' public sources);
#   3. `go install <module>@<version>` into .servers/bin/peers (how a user's machine
#      gets them; the Go module proxy must serve the module).
# If none gives a binary, it fails and names all three places.
#
# Usage: test/servers/find-peer.sh aws-encryption-provider|vault-kubernetes-kms
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${SERVERS_DIR:=$PWD/.servers}"
name=${1:?usage: find-peer.sh aws-encryption-provider|vault-kubernetes-kms}

case "$name" in
  aws-encryption-provider)
    variable=AWS_ENCRYPTION_PROVIDER_BIN
    package=sigs.k8s.io/aws-encryption-provider/cmd/server
    version=${AWS_ENCRYPTION_PROVIDER_VERSION:-6d4f71e96480}
    installed_as=server
    ;;
  vault-kubernetes-kms)
    variable=VAULT_KUBERNETES_KMS_BIN
    package=github.com/FalcoSuessgott/vault-kubernetes-kms
    version=${VAULT_KUBERNETES_KMS_VERSION:-c3bc385fd531}
    installed_as=vault-kubernetes-kms
    ;;
  *)
    echo "find-peer.sh: unknown peer '$name' (aws-encryption-provider or vault-kubernetes-kms)" >&2
    exit 2
    ;;
esac

dir="$SERVERS_DIR/bin/peers"
cached="$dir/$name"
mkdir -p "$dir"

# cache SOURCE LABEL: copy SOURCE to $cached (unless already identical), print the path.
cache() {
  local source=$1 label=$2
  [ -x "$source" ] && [ -s "$source" ] || return 1
  if ! { [ -x "$cached" ] && cmp -s "$source" "$cached"; }; then
    cp "$source" "$cached.tmp" && chmod 755 "$cached.tmp" && mv "$cached.tmp" "$cached"
  fi
  echo "$label" >"$cached.source"
  echo "$cached"
}

from_variable=${!variable:-}
if [ -n "$from_variable" ]; then
  cache "$from_variable" "$variable" && exit 0
  echo "find-peer.sh: $variable is set but is not an executable file" >&2
fi

shared="$PWD/../shared/test-servers/peers/$name"
if [ -f "$shared" ]; then
  cache "$shared" "../shared/test-servers/peers" && exit 0
fi

if [ -x "$cached" ] && [ "$(cat "$cached.source" 2>/dev/null)" = "go install $package@$version" ]; then
  echo "$cached"
  exit 0
fi
go_log="$SERVERS_DIR/logs/$name.go-install.log"
mkdir -p "$SERVERS_DIR/logs"
if command -v go >/dev/null 2>&1 &&
  GOBIN="$dir/go" CGO_ENABLED=0 go install -trimpath "$package@$version" >"$go_log" 2>&1 &&
  cache "$dir/go/$installed_as" "go install $package@$version" >/dev/null; then
  echo "$cached"
  exit 0
fi

cat >&2 <<EOF
no $name binary found. Tried, in order:
  1. $variable (${from_variable:-not set})
  2. ../shared/test-servers/peers/$name next to the repository (absent)
  3. go install $package@$version
     ($(command -v go >/dev/null 2>&1 && echo "failed: see $go_log" || echo "go not installed"))
Set $variable to a built $name binary.
EOF
exit 1
