#!/usr/bin/env bash
# vault-kubernetes-kms (FalcoSuessgott/vault-kubernetes-kms, MIT): a third-party
# Kubernetes KMS v2 plugin for Vault transit, run against OpenBao with AppRole as the
# inner plugin of the kms-plugin backend's tests (test/backends/kms-plugin*.test.ts).
# Needs OpenBao running first (test/servers/up.sh starts the peers after the servers).
#
# It gets a transit key, a policy and an AppRole role of its own (all named
# vault-kubernetes-kms), so its copies never share a key with the native vault backend.
# The plugin takes the AppRole secret_id only as a flag: on a real node that puts it in
# the process list, readable by local users; here it is a throwaway test credential.
#
# The binary comes from test/servers/find-peer.sh (an environment variable, then the
# shared prebuilt folder, then `go install`); without one, install fails, and so does CI.
# The socket lives in .servers/kms-plugins/, mode 0700.
#
# Usage: SERVERS_DIR=.servers test/servers/vault-kubernetes-kms.server.sh install|start|stop
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${SERVERS_DIR:=$PWD/.servers}"
export SERVERS_DIR
mkdir -p "$SERVERS_DIR/env" "$SERVERS_DIR/logs" "$SERVERS_DIR/bin"
# shellcheck source=lib.sh
source test/servers/lib.sh

NAME=vault-kubernetes-kms
KEY=vault-kubernetes-kms
SOCKETS="$SERVERS_DIR/kms-plugins"
SOCKET="$SOCKETS/$NAME.sock"
DATA="$SERVERS_DIR/$NAME"
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

env_value() {
  sed -n "s/^$2=//p" "$1" | head -1
}

start() {
  if [ -f "$SERVERS_DIR/env/$NAME.env" ] && running && status_ok >/dev/null 2>&1; then
    echo "$NAME already answering on $SOCKET"
    return 0
  fi
  local bao_env="$SERVERS_DIR/env/openbao.env"
  [ -f "$bao_env" ] || { echo "$NAME needs OpenBao: run test/servers/up.sh openbao $NAME" >&2; return 1; }
  local bin addr root role_id secret_id health_port
  bin=$(bash test/servers/find-peer.sh "$NAME")
  addr=$(env_value "$bao_env" VAULT_ADDR)
  root=$(env_value "$bao_env" VAULT_ROOT_TOKEN)
  bao() { BAO_ADDR="$addr" BAO_TOKEN="$root" "$SERVERS_DIR/bin/bao" "$@"; }

  # Idempotent set-up (OpenBao runs in memory: after its restart all of it is gone).
  bao write -f "transit/keys/$KEY" type=aes256-gcm96 >/dev/null
  bao policy write "$NAME" - >/dev/null <<HCL
path "transit/encrypt/$KEY" { capabilities = ["update"] }
path "transit/decrypt/$KEY" { capabilities = ["update"] }
path "transit/keys/$KEY" { capabilities = ["read"] }
HCL
  bao write "auth/approle/role/$NAME" token_policies="$NAME" token_ttl=1h token_max_ttl=4h secret_id_ttl=0 >/dev/null
  rm -rf "$DATA"
  mkdir -p "$DATA"
  chmod 700 "$DATA"
  role_id=$(bao read -field=role_id "auth/approle/role/$NAME/role-id")
  secret_id=$(bao write -f -field=secret_id "auth/approle/role/$NAME/secret-id")
  (umask 077 && printf '%s' "$role_id" >"$DATA/role-id" && printf '%s' "$secret_id" >"$DATA/secret-id")

  stop_daemon "$NAME"
  mkdir -p "$SOCKETS"
  chmod 700 "$SOCKETS"
  [ ! -S "$SOCKET" ] || rm -f "$SOCKET"
  # Its health port takes a port only and listens on every interface: loopback traffic only.
  health_port=$(free_port)
  start_daemon "$NAME" "$bin" -socket "unix://$SOCKET" -force-socket-overwrite -vault-address "$addr" \
    -auth-method approle -approle-role-id "$role_id" -approle-secret-id "$secret_id" \
    -transit-mount transit -transit-key "$KEY" -health-port "$health_port"
  wait_for "$NAME on $SOCKET" 30 status_ok
  write_env "$NAME" \
    "VAULT_KUBERNETES_KMS_SOCKET=$SOCKET" \
    "VAULT_KUBERNETES_KMS_BINARY=$bin" \
    "VAULT_KUBERNETES_KMS_VAULT_ADDR=$addr" \
    "VAULT_KUBERNETES_KMS_TRANSIT_KEY=$KEY" \
    "VAULT_KUBERNETES_KMS_ROLE_ID_FILE=$DATA/role-id" \
    "VAULT_KUBERNETES_KMS_SECRET_ID_FILE=$DATA/secret-id"
  echo "$NAME ($(cat "$(dirname "$bin")/$NAME.source" 2>/dev/null || echo "$bin")) ready on $SOCKET"
}

stop() {
  stop_daemon "$NAME"
  [ ! -S "$SOCKET" ] || rm -f "$SOCKET"
  rm -rf "$DATA"
}

case "${1:-}" in
  install) bash test/servers/find-peer.sh "$NAME" >/dev/null ;;
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
