#!/usr/bin/env bash
# SoftHSM2 (Debian package softhsm2, BSD-2-Clause): a real PKCS#11 module with
# tokens kept in files, used by test/backends/pkcs11.test.ts, the chaos rig and the
# bench. There is no daemon: "start" initialises a token in a folder of its own
# (.servers/softhsm, with its own SOFTHSM2_CONF), generates the backend's keys on it
# with `trousseau pkcs11-keygen`, and writes .servers/env/softhsm.env.
# See docs/backends/pkcs11.md, "Test server".
#
# Usage: SERVERS_DIR=... softhsm.server.sh install|start|stop
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=lib.sh
source test/servers/lib.sh

DATA="$SERVERS_DIR/softhsm"
TOKEN=trousseau-test

find_module() {
  local candidate
  for candidate in /usr/lib/softhsm/libsofthsm2.so /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so /usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so /usr/local/lib/softhsm/libsofthsm2.so; do
    if [ -f "$candidate" ]; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

case "${1:-}" in
  install)
    if command -v softhsm2-util >/dev/null && find_module >/dev/null; then
      echo "softhsm2 already installed: $(softhsm2-util --version)"
      exit 0
    fi
    command -v apt-get >/dev/null || { echo "SoftHSM2 is missing and there is no apt-get: install the softhsm2 package" >&2; exit 1; }
    [ "$(id -u)" -eq 0 ] || { echo "SoftHSM2 is missing: run as root, or apt-get install softhsm2" >&2; exit 1; }
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends softhsm2
    find_module >/dev/null || { echo "softhsm2 installed but libsofthsm2.so not found" >&2; exit 1; }
    ;;
  start)
    if [ -f "$SERVERS_DIR/env/softhsm.env" ] && [ -d "$DATA/tokens" ]; then
      echo "softhsm token already set up in $DATA"
      exit 0
    fi
    module=$(find_module) || { echo "softhsm2 is not installed; run: $0 install" >&2; exit 1; }
    rm -rf "$DATA"
    mkdir -p "$DATA/tokens" "$SERVERS_DIR/env"
    chmod 700 "$DATA"
    conf="$DATA/softhsm2.conf"
    cat >"$conf" <<CONF
directories.tokendir = $DATA/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
CONF
    export SOFTHSM2_CONF="$conf"
    # Test-only PINs, random per start, in files of mode 0600 like a real install's.
    (umask 077
      python3 -c 'import secrets; print(secrets.token_hex(8))' >"$DATA/user.pin"
      python3 -c 'import secrets; print(secrets.token_hex(8))' >"$DATA/so.pin")
    softhsm2-util --init-token --free --label "$TOKEN" --so-pin "$(cat "$DATA/so.pin")" --pin "$(cat "$DATA/user.pin")" >/dev/null
    keygen() {
      node_modules/.bin/node src/main.ts pkcs11-keygen --module "$module" --token-label "$TOKEN" --pin-file "$DATA/user.pin" --label "$1"
    }
    keygen trousseau-1
    keygen trousseau-2
    write_env softhsm \
      "SOFTHSM2_CONF=$conf" \
      "SOFTHSM_MODULE=$module" \
      "SOFTHSM_TOKEN_LABEL=$TOKEN" \
      "SOFTHSM_PIN_FILE=$DATA/user.pin" \
      "SOFTHSM_SO_PIN_FILE=$DATA/so.pin" \
      "SOFTHSM_KEY_LABEL=trousseau-1" \
      "SOFTHSM_KEY_B_LABEL=trousseau-2" \
      "SOFTHSM_DIR=$DATA"
    echo "softhsm token $TOKEN ready in $DATA"
    ;;
  stop)
    rm -rf "$DATA"
    rm -f "$SERVERS_DIR/env/softhsm.env"
    ;;
  *)
    echo "usage: $0 install|start|stop" >&2
    exit 2
    ;;
esac
