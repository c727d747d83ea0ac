#!/usr/bin/env bash
# The end-to-end suite: a real kube-apiserver and etcd, the plugin against the real test
# servers. `npm run test:e2e` runs it with the plugin from the container image;
# `npm run test:e2e -- --no-image` with the plugin from this checkout. Other arguments
# go to ava (e.g. a file: test/e2e/examples.e2e.ts, or --match).
#
# 1. builds kube-apiserver, kubectl, etcd and etcdctl once (test/e2e/build-kube.sh,
#    cached under .servers/kube/);
# 2. starts the backend servers the plugin configuration needs (idempotent);
# 3. runs the test/e2e/*.e2e.ts files one at a time (test/e2e/ava.config.js).
set -euo pipefail
cd "$(dirname "$0")/../.."

plugin=image
ava_args=()
for arg in "$@"; do
  case $arg in
    --no-image) plugin=checkout ;;
    *) ava_args+=("$arg") ;;
  esac
done

built=$(bash test/e2e/build-kube.sh)
kube_bin=$(sed -n 's/^kube=//p' <<<"$built")
etcd_bin=$(sed -n 's/^etcd=//p' <<<"$built")

bash test/servers/up.sh openbao local-kms lowkey-vault

export TROUSSEAU_E2E_KUBE_BIN=$kube_bin TROUSSEAU_E2E_ETCD_BIN=$etcd_bin TROUSSEAU_E2E_PLUGIN=$plugin
export UV_USE_IO_URING=0
echo "e2e: $("$kube_bin/kube-apiserver" --version), etcd $("$etcd_bin/etcd" --version | sed -n 's/^etcd Version: //p'), plugin from the $plugin"
exec npx ava --config test/e2e/ava.config.js "${ava_args[@]}"
