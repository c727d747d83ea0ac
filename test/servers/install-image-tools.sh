#!/usr/bin/env bash
# Installs what `npm run image` (deploy/image/build.sh) and deploy/image/run.sh need:
# buildah to assemble and commit the image from scratch, podman + runc to run it,
# skopeo to copy it out as an OCI archive, umoci and mmdebstrap for inspection, plus
# the helpers rootful podman uses. Debian packages only (no base image, no Docker).
#
# Idempotent: returns at once when every tool is already there. Needs root for apt-get
# (CI runs as root on a fresh Debian machine); fails with the reason otherwise.
# Usage: bash test/servers/install-image-tools.sh
set -euo pipefail

tools=(buildah podman runc skopeo umoci)
packages=(buildah podman runc skopeo umoci mmdebstrap uidmap fuse-overlayfs slirp4netns
  containernetworking-plugins iptables catatonit ca-certificates)

missing=()
for tool in "${tools[@]}"; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi

fail() { echo "install-image-tools: $*" >&2; exit 1; }
command -v apt-get >/dev/null 2>&1 || fail "missing ${missing[*]} and no apt-get on this machine: install the Debian packages ${packages[*]} by hand"
[ "$(id -u)" -eq 0 ] || fail "missing ${missing[*]}: apt-get needs root (run this script as root, or install ${packages[*]})"

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq || fail "apt-get update failed (no package mirror reachable?)"
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null ||
  fail "apt-get install ${packages[*]} failed"

for tool in "${tools[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || fail "$tool is still missing after apt-get install"
done
echo "install-image-tools: installed ${packages[*]}"
