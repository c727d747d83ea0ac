#!/usr/bin/env bash
# Kubernetes conformance harness: drives the Trousseau plugin (node src/main.ts) with
# kube-apiserver's own KMS client code (k8s.io/apiserver). Needs Go and the repository's
# node_modules; builds nothing in the repository.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

if [[ ! -x "$root/node_modules/.bin/node" ]]; then
  echo "test/k8s: $root/node_modules/.bin/node missing (run npm ci first)" >&2
  exit 1
fi

cd "$here"
export TROUSSEAU_REPO_ROOT="$root"
# Scenarios run in parallel (each has its own plugin process and temp dirs); several
# of them spend most of their time waiting on the apiserver's fixed timers.
exec go test ./... -count=1 -v -timeout "${K8S_TEST_TIMEOUT:-10m}" -parallel "${K8S_TEST_PARALLEL:-4}" "$@"
