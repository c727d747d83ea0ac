#!/usr/bin/env bash
# Stops the real backend servers started by up.sh.
#
# Usage: test/servers/down.sh [name ...]   (default: all)
# Names are the scripts' (openbao, local-kms, lowkey-vault, moto); the backend types
# are accepted as aliases: vault -> openbao, aws-kms -> local-kms, azure -> lowkey-vault.
set -uo pipefail
cd "$(dirname "$0")/../.."
export SERVERS_DIR="$PWD/.servers"

names=()
for arg in "$@"; do
  case "$arg" in
    vault) names+=(openbao) ;;
    aws-kms) names+=(local-kms) ;;
    azure | azure-keyvault) names+=(lowkey-vault) ;;
    *)
      if [ ! -f "test/servers/$arg.server.sh" ]; then
        echo "down.sh: unknown server '$arg'" >&2
        exit 2
      fi
      names+=("$arg")
      ;;
  esac
done
if [ ${#names[@]} -eq 0 ]; then
  for script in test/servers/*.server.sh; do
    names+=("$(basename "$script" .server.sh)")
  done
fi

for name in "${names[@]}"; do
  bash "test/servers/$name.server.sh" stop || true
done
