#!/usr/bin/env bash
# Stops every real backend server started by up.sh.
set -uo pipefail
cd "$(dirname "$0")/../.."
export SERVERS_DIR="$PWD/.servers"
for script in test/servers/*.server.sh; do
  bash "$script" stop || true
done
