#!/usr/bin/env bash
# moto (PyPI moto[server], Apache-2.0): a broad AWS API emulator. test/backends/aws.test.ts
# runs the conformance kit against its KMS API and uses its ReplicateKey for the
# replica (multi-Region) tests. It does not enforce key state (a disabled key still
# encrypts): those paths are tested on local-kms. See docs/backends/aws-kms.md.
#
# Usage: SERVERS_DIR=... moto.server.sh install|start|stop
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=lib.sh
source test/servers/lib.sh

VERSION=5.2.5
PORT=${MOTO_PORT:-5599}
REGION=us-east-1
REPLICA_REGION=us-west-2
VENV="$SERVERS_DIR/moto-venv"

case "${1:-}" in
  install)
    if [ -x "$VENV/bin/moto_server" ] && "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('moto') != '$VERSION')"; then
      echo "moto $VERSION already installed"
      exit 0
    fi
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$VERSION"
    ;;
  start)
    endpoint="http://127.0.0.1:$PORT"
    if "$VENV/bin/python" -c "import urllib.request; urllib.request.urlopen('$endpoint/moto-api/data.json', timeout=2)" 2>/dev/null \
      && [ -f "$SERVERS_DIR/env/moto.env" ]; then
      echo "moto already answering on $endpoint"
      exit 0
    fi
    [ -x "$VENV/bin/moto_server" ] || { echo "moto is not installed; run: $0 install" >&2; exit 1; }
    mkdir -p "$SERVERS_DIR/logs" "$SERVERS_DIR/env"
    start_daemon moto "$VENV/bin/moto_server" -H 127.0.0.1 -p "$PORT"
    wait_for "moto on $endpoint" 60 "$VENV/bin/python" -c \
      "import urllib.request; urllib.request.urlopen('$endpoint/moto-api/data.json', timeout=2)"
    # Keys live in moto's memory: create them now with boto3 (installed with moto).
    # Output: KEY=VALUE lines for write_env.
    seeded=$(AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_SESSION_TOKEN= \
      AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null \
      "$VENV/bin/python" - "$endpoint" "$REGION" "$REPLICA_REGION" <<'PY'
import sys, boto3
endpoint, region, replica_region = sys.argv[1:4]
kms = boto3.client("kms", endpoint_url=endpoint, region_name=region)
a = kms.create_key(Description="trousseau test key A")["KeyMetadata"]["Arn"]
b = kms.create_key(Description="trousseau test key B")["KeyMetadata"]["Arn"]
kms.create_alias(AliasName="alias/trousseau-test", TargetKeyId=a)
# A multi-Region key and its replica in a second region. moto 5.2.5 encrypts under
# them but cannot decrypt: its ciphertext format keeps only 36 characters of the key
# id, and mrk- ids have 40 (see docs/backends/aws-kms.md).
mrk = kms.create_key(Description="trousseau multi-Region test key", MultiRegion=True)["KeyMetadata"]
# moto 5.2.5 looks ReplicateKey's KeyId up verbatim: it must be the bare key id, not the ARN.
replica = kms.replicate_key(KeyId=mrk["KeyId"], ReplicaRegion=replica_region)["ReplicaKeyMetadata"]["Arn"]
alias_arn = a.split(":key/")[0] + ":alias/trousseau-test"
print(f"MOTO_KEY_ARN={a}")
print(f"MOTO_KEY_B_ARN={b}")
print("MOTO_ALIAS=alias/trousseau-test")
print(f"MOTO_ALIAS_ARN={alias_arn}")
print(f"MOTO_MRK_ARN={mrk['Arn']}")
print(f"MOTO_MRK_REPLICA_ARN={replica}")
print(f"MOTO_REPLICA_REGION={replica_region}")
PY
    )
    mapfile -t vars <<<"$seeded"
    unreachable=$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
    write_env moto \
      "MOTO_ENDPOINT=$endpoint" \
      "MOTO_REGION=$REGION" \
      "${vars[@]}" \
      "MOTO_ACCESS_KEY_ID=test" \
      "MOTO_SECRET_ACCESS_KEY=test" \
      "MOTO_UNREACHABLE_ENDPOINT=http://127.0.0.1:$unreachable"
    echo "moto ready on $endpoint"
    ;;
  stop)
    stop_daemon moto
    ;;
  *)
    echo "usage: $0 install|start|stop" >&2
    exit 2
    ;;
esac
