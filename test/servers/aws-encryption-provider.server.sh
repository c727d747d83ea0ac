#!/usr/bin/env bash
# aws-encryption-provider (kubernetes-sigs/aws-encryption-provider, Apache-2.0): a
# third-party Kubernetes KMS v2 plugin, run against local-kms as the inner plugin of the
# kms-plugin backend's tests (test/backends/kms-plugin*.test.ts) and of the bench.
# Needs local-kms running first (test/servers/up.sh starts the peers after the servers).
#
# The binary comes from test/servers/find-peer.sh (an environment variable, then the
# shared prebuilt folder, then `go install`); without one, install fails, and so does CI.
# The socket lives in .servers/kms-plugins/, mode 0700: whoever can reach that socket can
# have keys wrapped and unwrapped (docs/backends/kms-plugin.md, "Trust").
#
# Usage: SERVERS_DIR=.servers test/servers/aws-encryption-provider.server.sh install|start|stop
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${SERVERS_DIR:=$PWD/.servers}"
export SERVERS_DIR
mkdir -p "$SERVERS_DIR/env" "$SERVERS_DIR/logs" "$SERVERS_DIR/bin"
# shellcheck source=lib.sh
source test/servers/lib.sh

NAME=aws-encryption-provider
SOCKETS="$SERVERS_DIR/kms-plugins"
SOCKET="$SOCKETS/$NAME.sock"
NODE=node_modules/.bin/node

status_ok() {
  "$NODE" test/servers/kms-v2-status.ts "$SOCKET" 2000
}

running() {
  local pidfile="$SERVERS_DIR/$NAME.pid"
  [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# env_value FILE KEY: a value from a server's env file.
env_value() {
  sed -n "s/^$2=//p" "$1" | head -1
}

start() {
  if [ -f "$SERVERS_DIR/env/$NAME.env" ] && running && status_ok >/dev/null 2>&1; then
    echo "$NAME already answering on $SOCKET"
    return 0
  fi
  local kms_env="$SERVERS_DIR/env/local-kms.env"
  [ -f "$kms_env" ] || { echo "$NAME needs local-kms: run test/servers/up.sh local-kms $NAME" >&2; return 1; }
  local bin endpoint region key access secret health_port
  bin=$(bash test/servers/find-peer.sh "$NAME")
  endpoint=$(env_value "$kms_env" LOCAL_KMS_ENDPOINT)
  region=$(env_value "$kms_env" LOCAL_KMS_REGION)
  key=$(env_value "$kms_env" LOCAL_KMS_KEY_ARN)
  access=$(env_value "$kms_env" LOCAL_KMS_ACCESS_KEY_ID)
  secret=$(env_value "$kms_env" LOCAL_KMS_SECRET_ACCESS_KEY)
  stop_daemon "$NAME"
  mkdir -p "$SOCKETS"
  chmod 700 "$SOCKETS"
  [ ! -S "$SOCKET" ] || rm -f "$SOCKET"
  health_port=$(free_port)
  # Credentials through the environment, as for any AWS SDK program.
  AWS_ACCESS_KEY_ID=$access AWS_SECRET_ACCESS_KEY=$secret AWS_EC2_METADATA_DISABLED=true \
    start_daemon "$NAME" "$bin" --listen "$SOCKET" --key "$key" --region "$region" \
    --kms-endpoint "$endpoint" --health-port "127.0.0.1:$health_port" --health-kms-version v2
  wait_for "$NAME on $SOCKET" 30 status_ok
  # The command line's parts, for tests that start (and kill) instances of their own.
  write_env "$NAME" \
    "AWS_ENCRYPTION_PROVIDER_SOCKET=$SOCKET" \
    "AWS_ENCRYPTION_PROVIDER_BINARY=$bin" \
    "AWS_ENCRYPTION_PROVIDER_KEY_ARN=$key" \
    "AWS_ENCRYPTION_PROVIDER_KMS_ENDPOINT=$endpoint" \
    "AWS_ENCRYPTION_PROVIDER_REGION=$region" \
    "AWS_ENCRYPTION_PROVIDER_ACCESS_KEY_ID=$access" \
    "AWS_ENCRYPTION_PROVIDER_SECRET_ACCESS_KEY=$secret"
  echo "$NAME ($(cat "$(dirname "$bin")/$NAME.source" 2>/dev/null || echo "$bin")) ready on $SOCKET"
}

stop() {
  stop_daemon "$NAME"
  [ ! -S "$SOCKET" ] || rm -f "$SOCKET"
}

case "${1:-}" in
  install) bash test/servers/find-peer.sh "$NAME" >/dev/null ;;
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
