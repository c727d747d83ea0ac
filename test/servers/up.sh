#!/usr/bin/env bash
# Installs (once, into .servers/) and starts every real backend server the tests use,
# on 127.0.0.1. Idempotent: a server already answering is left alone.
#
# Each server has a script test/servers/<name>.server.sh taking `install`, `start`
# or `stop`. `start` waits for readiness with a deadline and writes the variables
# tests need to .servers/env/<name>.env (KEY=VALUE lines). Tests read those files
# through test/helpers/servers.ts.
#
# Usage: test/servers/up.sh [name ...]   (default: all)
set -euo pipefail
cd "$(dirname "$0")/../.."
export SERVERS_DIR="$PWD/.servers"
mkdir -p "$SERVERS_DIR/env" "$SERVERS_DIR/logs" "$SERVERS_DIR/bin"

names=("$@")
if [ ${#names[@]} -eq 0 ]; then
  for script in test/servers/*.server.sh; do
    base=$(basename "$script" .server.sh)
    names+=("$base")
  done
fi

# Peer KMS plugins run against a backend server (aws-encryption-provider against
# local-kms, vault-kubernetes-kms against OpenBao): they start after every other server.
peers=" aws-encryption-provider vault-kubernetes-kms "
ordered=()
for name in "${names[@]}"; do case "$peers" in *" $name "*) ;; *) ordered+=("$name") ;; esac; done
for name in "${names[@]}"; do case "$peers" in *" $name "*) ordered+=("$name") ;; esac; done
names=("${ordered[@]}")

# Installs run in parallel (they are downloads and builds); starts run in order.
# A server that cannot be installed does not keep the others down: they still start,
# so that the tests which fail are those that need it, not every backend test, and
# the script exits 1 at the end naming it.
pids=()
for name in "${names[@]}"; do
  ( bash "test/servers/$name.server.sh" install >"$SERVERS_DIR/logs/$name.install.log" 2>&1 \
      || { echo "install of $name failed; see $SERVERS_DIR/logs/$name.install.log" >&2; tail -30 "$SERVERS_DIR/logs/$name.install.log" >&2; exit 1; } ) &
  pids+=($!)
done
not_installed=()
installed=()
for i in "${!pids[@]}"; do
  if wait "${pids[$i]}"; then installed+=("${names[$i]}"); else not_installed+=("${names[$i]}"); fi
done

for name in ${installed[@]+"${installed[@]}"}; do
  echo "starting $name"
  bash "test/servers/$name.server.sh" start
done

# The plugin's own configuration against these servers: test/servers/trousseau.yaml
# assumes the default ports; .servers/trousseau.yaml is the same file with the
# addresses of the servers actually running and paths relative to .servers/.
render_trousseau_config() {
  local env
  for env in openbao local-kms lowkey-vault; do
    [ -f "$SERVERS_DIR/env/$env.env" ] || return 0
  done
  mkdir -p "$SERVERS_DIR/trousseau"
  chmod 700 "$SERVERS_DIR/trousseau"
  if [ ! -s "$SERVERS_DIR/trousseau/local.key" ]; then
    (umask 077 && head -c 32 /dev/urandom | base64 >"$SERVERS_DIR/trousseau/local.key")
  fi
  python3 - "$SERVERS_DIR" <<'PY2'
import sys
servers = sys.argv[1]
env = {}
for name in ("openbao", "local-kms", "lowkey-vault"):
    for line in open(f"{servers}/env/{name}.env"):
        key, sep, value = line.rstrip("\n").partition("=")
        if sep:
            env[key] = value
text = open("test/servers/trousseau.yaml").read()
for default, actual in (
    ("http://127.0.0.1:8200", env["VAULT_ADDR"]),
    ("http://127.0.0.1:4599", env["LOCAL_KMS_ENDPOINT"]),
    ("arn:aws:kms:us-east-1:111122223333:key/6f0c2d1e-3b4a-4c5d-8e9f-0a1b2c3d4e5f", env["LOCAL_KMS_KEY_ARN"]),
    ("https://localhost:8443", env["AZURE_KV_URL"]),
    ("../../.servers/", ""),
):
    text = text.replace(default, actual)
open(f"{servers}/trousseau.yaml", "w").write(text)
with open(f"{servers}/trousseau.env", "w") as out:
    out.write(f"AWS_ACCESS_KEY_ID={env['LOCAL_KMS_ACCESS_KEY_ID']}\n")
    out.write(f"AWS_SECRET_ACCESS_KEY={env['LOCAL_KMS_SECRET_ACCESS_KEY']}\n")
    out.write("AWS_EC2_METADATA_DISABLED=true\n")
    out.write(f"IDENTITY_ENDPOINT={env['AZURE_KV_IDENTITY_ENDPOINT']}\n")
    out.write("IDENTITY_HEADER=trousseau-test\n")
PY2
  echo "plugin configuration for these servers: .servers/trousseau.yaml (variables: .servers/trousseau.env)"
}
render_trousseau_config

if [ ${#not_installed[@]} -gt 0 ]; then
  echo "servers up: ${installed[*]:-none}; not installed: ${not_installed[*]}" >&2
  exit 1
fi
echo "servers up: ${names[*]}"
