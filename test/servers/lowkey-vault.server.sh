#!/usr/bin/env bash
# Azure Key Vault API for the azure backend tests: lowkey-vault (nagyesta/lowkey-vault,
# MIT licence), the open-source Key Vault emulator, HTTPS on 127.0.0.1 with its
# bundled self-signed certificate, plus its plain-HTTP token port (/ping and a
# managed-identity token endpoint the real ManagedIdentityCredential talks to).
#
# Where the jar comes from, first found wins (cached as .servers/lowkey-vault/):
#   1. $LOWKEY_VAULT_JAR, a lowkey-vault-app jar a developer built or downloaded;
#   2. ../shared/test-servers/lowkey-vault/lowkey-vault-app.jar next to the repository,
#      when that folder exists (a jar built from lowkey-vault's source);
#   3. the Maven artifact com.github.nagyesta.lowkey-vault:lowkey-vault-app at
#      $LOWKEY_VAULT_VERSION, fetched with `mvn dependency:copy` (the user's Maven
#      settings and mirrors apply).
# If none gives a jar, install fails and names all three places.
#
# Java: lowkey-vault 5 and later need Java 25. Taken from $LOWKEY_VAULT_JAVA, else
# $JAVA_HOME when it is 25+, else the newest 25+ JDK under /usr/lib/jvm, else `java`
# on PATH when it is 25+.
#
# Network exposure: --server.address binds the HTTPS (Key Vault) port to 127.0.0.1,
# but lowkey-vault creates its token connector in code with a port and no address, so
# the token port listens on ALL interfaces; it has no option to change that. Anyone who
# can reach this machine can fetch a token for the test vault (its keys are test keys,
# created here). The script says so at start; run it on a machine whose firewall keeps
# the token port (LOWKEY_VAULT_TOKEN_PORT) private, or inside a network namespace.
#
# Relaxed ports (vaults matched by host name only) let tests reach the vault through a
# proxy on another port (test/chaos).
#
# Usage: SERVERS_DIR=.servers test/servers/lowkey-vault.server.sh install|start|stop
# Ports: LOWKEY_VAULT_PORT (HTTPS, default 8443), LOWKEY_VAULT_TOKEN_PORT (HTTP, default
# 8444); both below 32768, outside Linux's ephemeral range, so a client socket of some
# other process cannot hold them at start.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${SERVERS_DIR:=$PWD/.servers}"
export SERVERS_DIR
mkdir -p "$SERVERS_DIR/env" "$SERVERS_DIR/logs" "$SERVERS_DIR/bin"
# The physical folder: .servers may be a link shared by several checkouts, and the env
# file's paths must outlive the checkout that started the server.
SERVERS_DIR=$(cd "$SERVERS_DIR" && pwd -P)
# shellcheck source=lib.sh
source test/servers/lib.sh

LOWKEY_VAULT_VERSION=${LOWKEY_VAULT_VERSION:-7.3.74}
SHARED_JAR="$PWD/../shared/test-servers/lowkey-vault/lowkey-vault-app.jar"
PORT=${LOWKEY_VAULT_PORT:-8443}
TOKEN_PORT=${LOWKEY_VAULT_TOKEN_PORT:-8444}
# Start-up of this Spring Boot app: 14-60 s on two loaded cores; allow twice that.
READY_SECONDS=${LOWKEY_VAULT_READY_SECONDS:-150}
DIR="$SERVERS_DIR/lowkey-vault"
JAR="$DIR/lowkey-vault-app.jar"
CA="$DIR/ca.pem"
LOG="$SERVERS_DIR/logs/lowkey-vault.log"
VAULT_URL="https://localhost:$PORT"
PURGEABLE_URL="https://127.0.0.1:$PORT"
TOKEN_URL="http://127.0.0.1:$TOKEN_PORT"
KEY=trousseau-kek
# A second, RSA-2048 key for the chaos rig: its scenarios probe every backend every
# 200 ms, and each Azure probe costs two private-key operations (sign, unwrap) in the
# emulator. At RSA-4096 (about 8x the CPU of 2048) that alone took most of a core on a
# 2-core machine and starved the other backends' calls past their timeouts.
LIGHT_KEY=trousseau-kek-2048
# lowkey-vault's RSA wrapKey/unwrapKey also assert encrypt/decrypt (one handler serves
# both routes), and a key created without key_ops gets none; sign is for the
# signature that makes Azure copies unforgeable (docs/envelope.md).
KEY_OPS='["wrapKey","unwrapKey","encrypt","decrypt","sign","verify"]'

# copy_jar SOURCE LABEL: cache SOURCE as $JAR unless the same file is already there.
copy_jar() {
  local source=$1 label=$2
  [ -s "$source" ] || return 1
  if [ -s "$JAR" ] && cmp -s "$source" "$JAR"; then return 0; fi
  cp "$source" "$JAR.tmp" && mv "$JAR.tmp" "$JAR"
  echo "$label" >"$DIR/source"
}

install() {
  mkdir -p "$DIR"
  if [ -n "${LOWKEY_VAULT_JAR:-}" ]; then
    copy_jar "$LOWKEY_VAULT_JAR" "LOWKEY_VAULT_JAR" && return 0
    echo "LOWKEY_VAULT_JAR is set but is not a readable jar" >&2
  fi
  if [ -s "$SHARED_JAR" ]; then
    copy_jar "$SHARED_JAR" "../shared/test-servers/lowkey-vault" && return 0
  fi
  if [ -s "$JAR" ] && [ "$(cat "$DIR/source" 2>/dev/null)" = "maven $LOWKEY_VAULT_VERSION" ]; then
    return 0
  fi
  if command -v mvn >/dev/null 2>&1 &&
    mvn -q -B dependency:copy \
      -Dartifact="com.github.nagyesta.lowkey-vault:lowkey-vault-app:$LOWKEY_VAULT_VERSION" \
      -DoutputDirectory="$DIR/maven" -Dmdep.stripVersion=true >"$SERVERS_DIR/logs/lowkey-vault.maven.log" 2>&1 &&
    copy_jar "$DIR/maven/lowkey-vault-app.jar" "maven $LOWKEY_VAULT_VERSION"; then
    return 0
  fi
  cat >&2 <<EOF
no lowkey-vault jar found. Tried, in order:
  1. LOWKEY_VAULT_JAR (${LOWKEY_VAULT_JAR:-not set})
  2. ../shared/test-servers/lowkey-vault/lowkey-vault-app.jar next to the repository (absent)
  3. Maven artifact com.github.nagyesta.lowkey-vault:lowkey-vault-app:$LOWKEY_VAULT_VERSION
     ($(command -v mvn >/dev/null 2>&1 && echo "mvn failed: see $SERVERS_DIR/logs/lowkey-vault.maven.log" || echo "mvn not installed"))
Set LOWKEY_VAULT_JAR to a lowkey-vault-app jar (see docs/backends/azure-keyvault.md).
EOF
  return 1
}

java_major() {
  "$1" -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1
}

# A Java able to run the jar (25 or newer).
pick_java() {
  if [ -n "${LOWKEY_VAULT_JAVA:-}" ]; then echo "$LOWKEY_VAULT_JAVA"; return; fi
  local candidate best="" best_major=0 major
  if [ -n "${JAVA_HOME:-}" ] && [ -x "$JAVA_HOME/bin/java" ] && [ "$(java_major "$JAVA_HOME/bin/java")" -ge 25 ] 2>/dev/null; then
    echo "$JAVA_HOME/bin/java"
    return
  fi
  for candidate in /usr/lib/jvm/*/bin/java; do
    [ -x "$candidate" ] || continue
    major=$(java_major "$candidate")
    if [ "${major:-0}" -ge 25 ] && [ "$major" -gt "$best_major" ]; then
      best=$candidate
      best_major=$major
    fi
  done
  if [ -n "$best" ]; then echo "$best"; return; fi
  if command -v java >/dev/null 2>&1 && [ "$(java_major java)" -ge 25 ] 2>/dev/null; then
    command -v java
    return
  fi
  echo "lowkey-vault needs Java 25 or newer: none in JAVA_HOME, /usr/lib/jvm or PATH; set LOWKEY_VAULT_JAVA" >&2
  return 1
}

token_pinged() {
  curl -fsS -m 2 "$TOKEN_URL/ping" >/dev/null
}

vault_pinged() {
  curl -fsS -m 2 --cacert "$CA" "$VAULT_URL/ping" >/dev/null
}

# The server's own certificate (self-signed), trusted by the tests through caFile.
fetch_ca() {
  echo | openssl s_client -connect "127.0.0.1:$PORT" -servername localhost 2>/dev/null | openssl x509 >"$CA.tmp" && mv "$CA.tmp" "$CA"
}

token() {
  curl -fsS -m 10 -H "X-IDENTITY-HEADER: trousseau-test" \
    "$TOKEN_URL/metadata/identity/oauth2/token?api-version=2019-08-01&resource=$VAULT_URL" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["access_token"])'
}

create_key() { # name bits
  local bearer
  bearer=$(token)
  curl -fsS -m 60 --cacert "$CA" -X POST -H "Authorization: Bearer $bearer" -H "Content-Type: application/json" \
    -d "{\"kty\":\"RSA\",\"key_size\":$2,\"key_ops\":$KEY_OPS}" \
    "$VAULT_URL/keys/$1/create?api-version=7.4" >/dev/null
}

# The vault at 127.0.0.1 (a vault of its own, separate from localhost's) is replaced by
# one without soft delete, so a test can delete a key and create it again under the same
# name (on a recoverable vault the deleted name stays taken for 90 days).
purgeable_vault() {
  local management="$VAULT_URL/management/vault" curl_ca=(curl -fsS -m 30 --cacert "$CA")
  "${curl_ca[@]}" -X DELETE "$management?baseUri=$PURGEABLE_URL" >/dev/null || true
  "${curl_ca[@]}" -X DELETE "$management/purge?baseUri=$PURGEABLE_URL" >/dev/null || true
  "${curl_ca[@]}" -X POST -H "Content-Type: application/json" \
    -d "{\"baseUri\":\"$PURGEABLE_URL\",\"recoveryLevel\":\"Purgeable\"}" "$management" | grep -q '"Purgeable"'
}

fail_with_log() {
  echo "$1; last lines of $LOG:" >&2
  tail -40 "$LOG" >&2 || true
  stop_daemon lowkey-vault
  return 1
}

start() {
  if [ -f "$SERVERS_DIR/env/lowkey-vault.env" ] && token_pinged && vault_pinged 2>/dev/null; then
    echo "lowkey-vault already running on $VAULT_URL"
    return 0
  fi
  [ -s "$JAR" ] || install
  stop_daemon lowkey-vault
  local java started=$SECONDS
  java=$(pick_java)
  echo "starting lowkey-vault ($(cat "$DIR/source" 2>/dev/null)) with $("$java" -version 2>&1 | head -1)"
  echo "note: lowkey-vault's token port $TOKEN_PORT listens on all interfaces (it has no option to bind it to 127.0.0.1)" >&2
  # Serial GC and a small heap: about 200 MB RSS. Not C1-only: RSA key generation crawls.
  start_daemon lowkey-vault "$java" -Xms64m -Xmx256m -XX:+UseSerialGC -jar "$JAR" \
    --server.address=127.0.0.1 --server.port="$PORT" --app.token.port="$TOKEN_PORT" \
    --LOWKEY_VAULT_RELAXED_PORTS=true
  local pid deadline=$((SECONDS + READY_SECONDS))
  pid=$(cat "$SERVERS_DIR/lowkey-vault.pid")
  until token_pinged 2>/dev/null && fetch_ca && vault_pinged 2>/dev/null; do
    kill -0 "$pid" 2>/dev/null || { fail_with_log "lowkey-vault exited during start-up"; return 1; }
    [ $SECONDS -lt $deadline ] || { fail_with_log "lowkey-vault not ready after ${READY_SECONDS}s"; return 1; }
    sleep 1
  done
  wait_for "key creation on $VAULT_URL" 60 create_key "$KEY" 4096 || { fail_with_log "lowkey-vault did not create key $KEY"; return 1; }
  wait_for "key creation on $VAULT_URL" 60 create_key "$LIGHT_KEY" 2048 || { fail_with_log "lowkey-vault did not create key $LIGHT_KEY"; return 1; }
  purgeable_vault || { fail_with_log "lowkey-vault did not make $PURGEABLE_URL purgeable"; return 1; }
  echo "lowkey-vault ready on $VAULT_URL after $((SECONDS - started)) s"

  write_env lowkey-vault \
    "AZURE_KV_SERVER=lowkey-vault" \
    "AZURE_KV_URL=$VAULT_URL" \
    "AZURE_KV_KEY_NAME=$KEY" \
    "AZURE_KV_LIGHT_KEY_NAME=$LIGHT_KEY" \
    "AZURE_KV_KEY_OPS=$(echo "$KEY_OPS" | tr -d '[]"')" \
    "AZURE_KV_PURGEABLE_URL=$PURGEABLE_URL" \
    "AZURE_KV_CA_FILE=$CA" \
    "AZURE_KV_IDENTITY_ENDPOINT=$TOKEN_URL/metadata/identity/oauth2/token" \
    "AZURE_KV_UNREACHABLE_URL=https://localhost:1"
}

stop() {
  stop_daemon lowkey-vault
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
