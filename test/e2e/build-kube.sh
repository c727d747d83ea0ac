#!/usr/bin/env bash
# Builds the binaries the end-to-end suite runs -- kube-apiserver, kubectl, etcd,
# etcdctl -- from the Go module proxy, once. The versions are the ones pinned in
# test/e2e/kube/go.mod and test/e2e/etcd/go.mod; the binaries are cached under
# .servers/kube/<version>/ and rebuilt only when a pinned version changes (a different
# version is a different folder). Prints the two folders on its last two lines:
#   kube=<folder with kube-apiserver and kubectl>
#   etcd=<folder with etcd and etcdctl>
# A cold build takes 15-30 minutes on 2 busy cores (kube-apiserver alone ~16).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)

pinned() { # <go.mod> <module path>: the version required in that go.mod
  awk -v m="$2" '$1 == m && $2 ~ /^v[0-9]/ { print $2; exit } $1 == "require" && $2 == m { print $3; exit }' "$1"
}
kube_version=$(pinned "$here/kube/go.mod" k8s.io/kubernetes)
etcd_version=$(pinned "$here/etcd/go.mod" go.etcd.io/etcd/server/v3)
[ -n "$kube_version" ] && [ -n "$etcd_version" ] || { echo "build-kube: no pinned version found in test/e2e/*/go.mod" >&2; exit 1; }

kube_dir=$root/.servers/kube/$kube_version
etcd_dir=$root/.servers/kube/etcd-$etcd_version
mkdir -p "$root/.servers/kube"

# .servers is shared by several checkouts: one build at a time, the others wait for it.
exec 9>"$root/.servers/kube/.build.lock"
flock 9

export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS="-mod=readonly -buildvcs=false"

build() { # <module dir> <output folder> <binary name> <package> [ldflags]
  local module=$1 out=$2 name=$3 pkg=$4 ldflags=${5:-}
  if [ -x "$out/$name" ]; then return 0; fi
  mkdir -p "$out"
  local start=$SECONDS
  echo "build-kube: building $name ($pkg) ..." >&2
  # Into a temporary name first, so that an interrupted build never leaves a binary that
  # looks cached.
  (cd "$module" && go build -trimpath -ldflags "-s -w $ldflags" -o "$out/.$name.partial" "$pkg")
  mv -f "$out/.$name.partial" "$out/$name"
  echo "build-kube: $name built in $((SECONDS - start)) s" >&2
}

# Without these the binaries report v0.0.0-master, and the apiserver's /version says so.
minor=${kube_version#v1.}
minor=${minor%%.*}
version_pkg=k8s.io/component-base/version
kube_ldflags="-X $version_pkg.gitVersion=$kube_version -X $version_pkg.gitMajor=1 -X $version_pkg.gitMinor=$minor -X $version_pkg.gitTreeState=clean"

build "$here/etcd" "$etcd_dir" etcd go.etcd.io/etcd/server/v3
build "$here/etcd" "$etcd_dir" etcdctl go.etcd.io/etcd/etcdctl/v3
build "$here/kube" "$kube_dir" kubectl k8s.io/kubernetes/cmd/kubectl "$kube_ldflags"
build "$here/kube" "$kube_dir" kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$kube_ldflags"

echo "kube=$kube_dir"
echo "etcd=$etcd_dir"
