#!/usr/bin/env bash
# Removes from a production node_modules what nothing loads at run time.
# Usage: trim.sh NODE_MODULES
set -euo pipefail
dir=$1
[ -d "$dir" ] || { echo "trim.sh: $dir is not a folder" >&2; exit 1; }
