#!/usr/bin/env bash
# Azure Key Vault API for the azure backend tests: lowkey-vault (nagyesta/lowkey-vault,
# MIT) on 127.0.0.1, HTTPS with its bundled self-signed certificate, plus its plain-HTTP
# token port (/ping, a managed-identity token endpoint, the certificate as .p12).
#
# WHERE THE JAR COMES FROM (read docs/backends/azure-keyvault.md, "Test server"):
#   1. LOWKEY_VAULT_JAR=/path/to/lowkey-vault-app-<v>.jar, if a developer has one; else
#   2. Maven Central: com.github.nagyesta.lowkey-vault:lowkey-vault-app:$LOWKEY_VAULT_VERSION.
#      As checked on the CI machine, Maven Central serves lowkey-vault-client and
#      lowkey-vault-testcontainers but NO version of lowkey-vault-app (the app is
#      published to GitHub Packages and Docker Hub only), so this step fails there.
#   3. Otherwise the STAND-IN test/servers/lowkey-vault-standin.ts starts instead (same
#      ports and endpoints, our own reading of the Key Vault API, not lowkey-vault). The
#      env file says which one runs (AZURE_KV_SERVER); LOWKEY_VAULT_REQUIRED=1 makes a
#      missing jar an error instead.
# lowkey-vault 5 and later need Java 25: the script takes $LOWKEY_VAULT_JAVA, else a JDK
# 25+ from JAVA_HOME or /usr/lib/jvm, else `java` on PATH (enough for 2.x, Java 17).
#
# Usage: SERVERS_DIR=.servers test/servers/lowkey-vault.server.sh install|start|stop
# Ports: LOWKEY_VAULT_PORT (HTTPS, default 8443), LOWKEY_VAULT_TOKEN_PORT (HTTP, default 8444).
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${SERVERS_DIR:=$PWD/.servers}"
export SERVERS_DIR
mkdir -p "$SERVERS_DIR/env" "$SERVERS_DIR/logs" "$SERVERS_DIR/bin"
# shellcheck source=lib.sh
source test/servers/lib.sh

LOWKEY_VAULT_VERSION=${LOWKEY_VAULT_VERSION:-7.1.13}
PORT=${LOWKEY_VAULT_PORT:-8443}
TOKEN_PORT=${LOWKEY_VAULT_TOKEN_PORT:-8444}
DIR="$SERVERS_DIR/lowkey-vault"
JAR="$DIR/lowkey-vault-app.jar"
CA="$DIR/ca.pem"
VAULT_URL="https://localhost:$PORT"
TOKEN_URL="http://127.0.0.1:$TOKEN_PORT"
KEY=trousseau-kek
NODE="$PWD/node_modules/.bin/node"

install() {
  mkdir -p "$DIR"
  if [ -n "${LOWKEY_VAULT_JAR:-}" ]; then
    cp "$LOWKEY_VAULT_JAR" "$JAR"
  elif [ ! -s "$JAR" ] || [ "$(cat "$DIR/version" 2>/dev/null)" != "$LOWKEY_VAULT_VERSION" ]; then
    rm -f "$JAR"
    if mvn -q -B -U dependency:copy \
      -Dartifact="com.github.nagyesta.lowkey-vault:lowkey-vault-app:$LOWKEY_VAULT_VERSION" \
      -DoutputDirectory="$DIR" -Dmdep.stripVersion=true; then
      mv "$DIR/lowkey-vault-app.jar" "$JAR" 2>/dev/null || true
      echo "$LOWKEY_VAULT_VERSION" >"$DIR/version"
    else
      echo "!!! lowkey-vault-app $LOWKEY_VAULT_VERSION is not served by Maven Central here" >&2
      if [ "${LOWKEY_VAULT_REQUIRED:-0}" = 1 ]; then return 1; fi
      echo "!!! the azure tests will run against the stand-in (see docs/backends/azure-keyvault.md)" >&2
    fi
  fi
  if [ ! -s "$JAR" ]; then
    # The stand-in needs a certificate; lowkey-vault brings its own.
    [ -s "$DIR/standin-key.pem" ] || openssl req -x509 -newkey rsa:2048 -nodes -days 3650 \
      -subj "/CN=localhost" -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
      -keyout "$DIR/standin-key.pem" -out "$DIR/standin-cert.pem" 2>/dev/null
  fi
}

# A Java able to run the jar: lowkey-vault 5+ is compiled for Java 25.
pick_java() {
  if [ -n "${LOWKEY_VAULT_JAVA:-}" ]; then echo "$LOWKEY_VAULT_JAVA"; return; fi
  local major candidate
  major=$(cat "$DIR/version" 2>/dev/null | cut -d. -f1)
  if [ "${major:-0}" -ge 5 ]; then
    for candidate in "${JAVA_HOME:-/nonexistent}/bin/java" /usr/lib/jvm/*25*/bin/java /usr/lib/jvm/*2[6-9]*/bin/java; do
      if [ -x "$candidate" ] && "$candidate" -version 2>&1 | grep -Eq 'version "(2[5-9]|[3-9][0-9])'; then
        echo "$candidate"
        return
      fi
    done
    echo "lowkey-vault $LOWKEY_VAULT_VERSION needs Java 25 and none was found; set LOWKEY_VAULT_JAVA" >&2
    return 1
  fi
  command -v java
}

pinged() {
  curl -fsS -m 2 "$TOKEN_URL/ping" >/dev/null
}

create_key() {
  # lowkey-vault accepts any bearer token, so no challenge round-trip is needed.
  curl -fsS -m 30 --cacert "$CA" -X POST -H "Authorization: Bearer test" -H "Content-Type: application/json" \
    -d '{"kty":"RSA","key_size":4096,"key_ops":["wrapKey","unwrapKey","encrypt","decrypt"]}' \
    "$VAULT_URL/keys/$KEY/create?api-version=7.4" >/dev/null
}

start() {
  if [ -f "$SERVERS_DIR/env/lowkey-vault.env" ] && pinged; then
    echo "lowkey-vault already running on $VAULT_URL"
    return 0
  fi
  [ -s "$JAR" ] || [ -s "$DIR/standin-cert.pem" ] || install
  local server started=$SECONDS
  if [ -s "$JAR" ]; then
    server="lowkey-vault $(cat "$DIR/version" 2>/dev/null || echo '(local jar)')"
    local java
    java=$(pick_java)
    echo "starting $server with $("$java" -version 2>&1 | head -1)"
    start_daemon lowkey-vault "$java" -jar "$JAR" --server.address=127.0.0.1 --server.port="$PORT" --app.token.port="$TOKEN_PORT"
    # A Spring Boot app: 10-30 s on two cores, more on a loaded CI machine.
    wait_for "lowkey-vault on $TOKEN_URL/ping" 180 pinged
    curl -fsS -m 10 -o "$DIR/lowkey-vault.p12" "$TOKEN_URL/metadata/default-cert/lowkey-vault.p12"
    local alias
    alias=$(keytool -list -keystore "$DIR/lowkey-vault.p12" -storetype PKCS12 -storepass changeit | awk -F, '/PrivateKeyEntry/ {print $1; exit}')
    keytool -exportcert -rfc -keystore "$DIR/lowkey-vault.p12" -storetype PKCS12 -storepass changeit -alias "$alias" >"$CA"
  else
    if [ "${LOWKEY_VAULT_REQUIRED:-0}" = 1 ]; then echo "no lowkey-vault jar installed" >&2; return 1; fi
    server=standin
    echo "!!! starting the lowkey-vault STAND-IN, not lowkey-vault (see docs/backends/azure-keyvault.md)" >&2
    cp "$DIR/standin-cert.pem" "$CA"
    start_daemon lowkey-vault "$NODE" test/servers/lowkey-vault-standin.ts \
      --cert "$DIR/standin-cert.pem" --key "$DIR/standin-key.pem" --port "$PORT" --token-port "$TOKEN_PORT"
    wait_for "lowkey-vault stand-in on $TOKEN_URL/ping" 30 pinged
  fi
  wait_for "key creation on $VAULT_URL" 30 create_key
  echo "$server ready on $VAULT_URL after $((SECONDS - started)) s"

  write_env lowkey-vault \
    "AZURE_KV_SERVER=$server" \
    "AZURE_KV_URL=$VAULT_URL" \
    "AZURE_KV_KEY_NAME=$KEY" \
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
