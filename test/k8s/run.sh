#!/usr/bin/env bash
# Kubernetes conformance harness: drives the Trousseau plugin (node src/main.ts) with
# kube-apiserver's own KMS client code (k8s.io/apiserver). Needs Go and the repository's
# node_modules; builds nothing in the repository. Also checks the deployment files under
# deploy/ (deploy_test.go), with a helm CLI it installs into .servers/bin.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

if [[ ! -x "$root/node_modules/.bin/node" ]]; then
  echo "test/k8s: $root/node_modules/.bin/node missing (run npm ci first)" >&2
  exit 1
fi

# helm for the deploy/ chart tests (deploy_test.go): built once from the Go module
# proxy into .servers/bin, a no-op afterwards. A failed build fails the chart tests in
# CI (they look for the binary) rather than the whole harness.
if helm_bin="$(bash "$here/install-helm.sh" | tail -1)"; then
  export TROUSSEAU_HELM="$helm_bin"
else
  echo "test/k8s: installing helm failed; the Helm chart tests will fail (CI) or skip" >&2
fi

cd "$here"
export TROUSSEAU_REPO_ROOT="$root"
# Scenarios run in parallel (each has its own plugin process and temp dirs); several
# of them spend most of their time waiting on the apiserver's fixed timers.
exec go test ./... -count=1 -v -timeout "${K8S_TEST_TIMEOUT:-10m}" -parallel "${K8S_TEST_PARALLEL:-4}" "$@"
