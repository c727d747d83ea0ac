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

# Installs run in parallel (they are downloads and builds); starts run in order.
pids=()
for name in "${names[@]}"; do
  ( bash "test/servers/$name.server.sh" install >"$SERVERS_DIR/logs/$name.install.log" 2>&1 \
      || { echo "install of $name failed; see $SERVERS_DIR/logs/$name.install.log" >&2; tail -30 "$SERVERS_DIR/logs/$name.install.log" >&2; exit 1; } ) &
  pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
[ "$failed" -eq 0 ] || exit 1

for name in "${names[@]}"; do
  echo "starting $name"
  bash "test/servers/$name.server.sh" start
done
echo "servers up: ${names[*]}"
