#!/usr/bin/env bash
# local-kms (nsmithuk/local-kms, MIT): an AWS KMS API server written in Go, used by
# test/backends/aws.test.ts for the key-state error paths (disabled key, pending
# deletion) that moto does not enforce. See docs/backends/aws-kms.md, "Test servers".
#
# Usage: SERVERS_DIR=... local-kms.server.sh install|start|stop
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=lib.sh
source test/servers/lib.sh

# The Go module proxy serves the 3.x line (main package at the module root) only
# under this pseudo-version; the 3.x tags have no "v" prefix and commit queries are
# refused. See docs/backends/aws-kms.md.
MODULE=github.com/nsmithuk/local-kms
VERSION=v0.0.0-20260228092603-2a5e92d09ab6
PORT=${LOCAL_KMS_PORT:-4599}
REGION=us-east-1
ACCOUNT=111122223333
BIN="$SERVERS_DIR/bin/local-kms"
STAMP="$SERVERS_DIR/bin/local-kms.version"
DATA="$SERVERS_DIR/local-kms"
# Fixed key ids (not secrets); their key material is random on every start.
KEY_A=6f0c2d1e-3b4a-4c5d-8e9f-0a1b2c3d4e5f
KEY_B=7a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d
ALIAS=alias/trousseau-test

http_ok() {
  # local-kms answers only POST / with a JSON body and an X-Amz-Target header.
  python3 - "$1" <<'PY'
import sys, urllib.request
req = urllib.request.Request(sys.argv[1], data=b"{}", method="POST", headers={
    "Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": "TrentService.ListKeys"})
with urllib.request.urlopen(req, timeout=2) as r:
    sys.exit(0 if r.status == 200 else 1)
PY
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

random_hex32() {
  python3 -c 'import secrets; print(secrets.token_hex(32))'
}

case "${1:-}" in
  install)
    if [ -x "$BIN" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$VERSION" ]; then
      echo "local-kms $VERSION already installed"
      exit 0
    fi
    mkdir -p "$SERVERS_DIR/bin"
    GOBIN="$SERVERS_DIR/bin" GOFLAGS=-mod=mod go install "$MODULE@$VERSION"
    echo "$VERSION" >"$STAMP"
    ;;
  start)
    endpoint="http://127.0.0.1:$PORT"
    if http_ok "$endpoint/" 2>/dev/null && [ -f "$SERVERS_DIR/env/local-kms.env" ]; then
      echo "local-kms already answering on $endpoint"
      exit 0
    fi
    [ -x "$BIN" ] || { echo "local-kms is not installed; run: $0 install" >&2; exit 1; }
    # A fresh database on every start: seeding never overwrites existing keys, and the
    # tests disable and delete keys they create.
    rm -rf "$DATA"
    mkdir -p "$DATA/db" "$SERVERS_DIR/logs" "$SERVERS_DIR/env"
    cat >"$DATA/seed.yaml" <<YAML
Keys:
  Symmetric:
    Aes:
      - Metadata:
          KeyId: $KEY_A
          Description: trousseau test key A
        BackingKeys:
          - $(random_hex32)
      - Metadata:
          KeyId: $KEY_B
          Description: trousseau test key B
        BackingKeys:
          - $(random_hex32)
Aliases:
  - AliasName: $ALIAS
    TargetKeyId: $KEY_A
YAML
    chmod 600 "$DATA/seed.yaml"
    # local-kms has no bind-address option: it listens on all interfaces (":PORT").
    # Only loopback traffic is ever sent to it.
    PORT=$PORT KMS_REGION=$REGION KMS_ACCOUNT_ID=$ACCOUNT KMS_DATA_PATH="$DATA/db" KMS_SEED_PATH="$DATA/seed.yaml" \
      start_daemon local-kms "$BIN"
    wait_for "local-kms on $endpoint" 30 http_ok "$endpoint/"
    arn_prefix="arn:aws:kms:$REGION:$ACCOUNT"
    write_env local-kms \
      "LOCAL_KMS_ENDPOINT=$endpoint" \
      "LOCAL_KMS_REGION=$REGION" \
      "LOCAL_KMS_KEY_ARN=$arn_prefix:key/$KEY_A" \
      "LOCAL_KMS_KEY_B_ARN=$arn_prefix:key/$KEY_B" \
      "LOCAL_KMS_ALIAS=$ALIAS" \
      "LOCAL_KMS_ALIAS_ARN=$arn_prefix:$ALIAS" \
      "LOCAL_KMS_ACCESS_KEY_ID=test" \
      "LOCAL_KMS_SECRET_ACCESS_KEY=test" \
      "LOCAL_KMS_UNREACHABLE_ENDPOINT=http://127.0.0.1:$(free_port)"
    echo "local-kms ready on $endpoint"
    ;;
  stop)
    stop_daemon local-kms
    ;;
  *)
    echo "usage: $0 install|start|stop" >&2
    exit 2
    ;;
esac
