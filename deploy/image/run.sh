#!/usr/bin/env bash
# Runs the Trousseau image under podman the way the static pod (deploy/static-pod) runs
# it on a control-plane node, for the image test and the end-to-end suite:
#
#   run.sh --name NAME --socket-dir DIR --cache-dir DIR --config-dir DIR [--image REF]
#          [--env-file FILE] [--env K=V]... [--mount HOST:CONTAINER]... -- ARGS...
#       Runs the init container's command (hands the socket and cache folders to the
#       plugin's uid and gid, as the static pod's init container does), then starts the plugin
#       detached with ARGS (e.g. `serve --config /etc/trousseau/config.yaml`).
#       Prints nothing but the container id on success; on failure prints the reason
#       (and the container's log, if it got that far) on stderr and exits non-zero.
#   run.sh --stop NAME [--timeout SECONDS] [--logs FILE]
#       SIGTERM to the container's PID 1, waits for it to exit (default: the pod's
#       terminationGracePeriodSeconds), writes its log to FILE, removes the container.
#       Prints the exit code; exits 0 only when the container exited 0 in time (a
#       container still running at the deadline is killed and run.sh exits 2).
#
#   --socket-dir host folder mounted read-write at the socket folder (/var/run/trousseau),
#                created if missing, as the kubelet's DirectoryOrCreate does
#   --cache-dir  host folder mounted read-write at the compile cache folder
#                (/var/lib/trousseau/compile-cache, TROUSSEAU_COMPILE_CACHE), created if
#                missing; pass the same one to the next start, as a node keeps its own
#   --config-dir host folder mounted read-only at /etc/trousseau (config.yaml and
#                credentials/ as in deploy/static-pod)
#   --mount      another host path, read-only (e.g. a CA file a test server made)
#   --image      default: the reference in deploy/image/settings.json with package.json's
#                version as the tag, as `npm run image` tags it
#
# Every security setting comes from deploy/image/settings.json through
# deploy/image/podman-args.ts (the file test/deploy/image-settings.test.ts compares with
# the manifests): the non-root uid and gid, read-only root (no tmpfs), all capabilities
# dropped, no-new-privileges, the memory limit, the node's network. Also, for this
# kind of host: --runtime runc (crun refuses a hybrid cgroup layout) and ulimits no
# higher than the host's hard limits (podman's default nofile of 1048576 is refused).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
node="$root/node_modules/.bin/node"
[ -x "$node" ] || node=node

die() { echo "run.sh: $*" >&2; exit 1; }
command -v podman >/dev/null 2>&1 || die "podman is not installed (bash test/servers/install-image-tools.sh installs it)"
setting() { "$node" "$here/podman-args.ts" get "$1"; }
args_for() { "$node" "$here/podman-args.ts" "$1"; }

# The lower of the wanted limit and the host's hard limit: podman cannot raise a
# container's limit above what the host lets root have.
cap_limit() {
  local want=$1 hard=$2
  if [ "$hard" = unlimited ] || [ "$hard" -ge "$want" ]; then echo "$want"; else echo "$hard"; fi
}
ulimit_args() {
  local limits nofile nproc
  limits=$(setting ulimits)
  nofile=$("$node" -e 'process.stdout.write(String(JSON.parse(process.argv[1]).nofile))' "$limits")
  nproc=$("$node" -e 'process.stdout.write(String(JSON.parse(process.argv[1]).nproc))' "$limits")
  nofile=$(cap_limit "$nofile" "$(ulimit -Hn)")
  nproc=$(cap_limit "$nproc" "$(ulimit -Hu)")
  printf '%s\0' "--ulimit=nofile=$nofile:$nofile" "--ulimit=nproc=$nproc:$nproc"
}

stop() {
  local name=$1 timeout=$2 logs=$3 code
  podman container exists "$name" || die "no container named $name"
  [ -n "$timeout" ] || timeout=$(setting terminationGracePeriodSeconds)
  podman kill --signal TERM "$name" >/dev/null 2>&1 || true
  local deadline=$((SECONDS + timeout)) state
  while :; do
    state=$(podman inspect --format '{{.State.Status}}' "$name")
    [ "$state" = running ] || break
    if [ "$SECONDS" -ge "$deadline" ]; then
      podman kill --signal KILL "$name" >/dev/null 2>&1 || true
      podman wait "$name" >/dev/null 2>&1 || true
      [ -z "$logs" ] || podman logs "$name" >"$logs" 2>&1 || true
      podman rm -f "$name" >/dev/null 2>&1 || true
      echo timeout
      return 2
    fi
    sleep 0.2
  done
  code=$(podman wait "$name")
  [ -z "$logs" ] || podman logs "$name" >"$logs" 2>&1 || true
  podman rm -f "$name" >/dev/null 2>&1 || true
  echo "$code"
  [ "$code" = 0 ]
}

name='' socket_dir='' cache_dir='' config_dir='' image='' timeout='' logs='' stop_name=''
extra=()
while [ $# -gt 0 ]; do
  case $1 in
    --name) name=$2; shift 2 ;;
    --socket-dir) socket_dir=$2; shift 2 ;;
    --cache-dir) cache_dir=$2; shift 2 ;;
    --config-dir) config_dir=$2; shift 2 ;;
    --image) image=$2; shift 2 ;;
    --env) extra+=("--env=$2"); shift 2 ;;
    --env-file) [ -f "$2" ] || die "--env-file $2: no such file"; extra+=("--env-file=$2"); shift 2 ;;
    --mount)
      case $2 in /*:/*) ;; *) die "--mount wants HOST:CONTAINER, both absolute" ;; esac
      extra+=("--volume=$2:ro"); shift 2 ;;
    --stop) stop_name=$2; shift 2 ;;
    --timeout) timeout=$2; shift 2 ;;
    --logs) logs=$2; shift 2 ;;
    --) shift; break ;;
    *) die "unknown option $1 (see the top of this file)" ;;
  esac
done

if [ -n "$stop_name" ]; then
  stop "$stop_name" "$timeout" "$logs"
  exit $?
fi

[ -n "$name" ] || die "--name is required"
[ -n "$socket_dir" ] || die "--socket-dir is required"
[ -n "$cache_dir" ] || die "--cache-dir is required"
[ -n "$config_dir" ] || die "--config-dir is required"
[ -d "$config_dir" ] || die "--config-dir $config_dir is not a folder"
[ $# -gt 0 ] || die "the plugin's arguments go after -- (e.g. -- serve --config /etc/trousseau/config.yaml)"
[ -n "$image" ] || image=$(setting reference)
podman image exists "$image" || die "no image $image in podman's storage: build it with npm run image"

mkdir -p "$socket_dir" "$cache_dir"
socket_dir=$(cd "$socket_dir" && pwd)
cache_dir=$(cd "$cache_dir" && pwd)
config_dir=$(cd "$config_dir" && pwd)
container_socket_dir=$(setting socketDir)
container_cache_dir=$(setting compileCacheDir)
container_config_dir=$(setting configDir)
mapfile -d '' limits < <(ulimit_args)
common=(--runtime runc "${limits[@]}" "--volume=$socket_dir:$container_socket_dir" "--volume=$cache_dir:$container_cache_dir")

# The init container: root with CAP_CHOWN only, gives the socket and cache folders to the plugin.
mapfile -d '' init_args < <(args_for init)
if ! init_out=$(podman run --rm --name "$name-init" "${common[@]}" "${init_args[@]}" "$image" 2>&1); then
  die "the host-folders init container failed: $init_out"
fi

mapfile -d '' container_args < <(args_for container)
errors=$(mktemp)
trap 'rm -f "$errors"' EXIT
if ! id=$(podman run --detach --name "$name" "${common[@]}" "${container_args[@]}" \
  "--volume=$config_dir:$container_config_dir:ro" "${extra[@]}" "$image" "$@" 2>"$errors"); then
  die "podman run failed: $(cat "$errors")"
fi
echo "$id"
