#!/usr/bin/env bash
# Removes from the image's production node_modules what Node never loads at run time.
# Each rule is safe by how Node resolves modules, not by a guess at what is used; the
# image test (test/image/) then runs the image against every backend type.
# Measured on the 0.1.0 dependencies (gzip of node_modules: 14.4 MB before, 4.9 MB after):
#   source maps (*.map)                              14.4 -> 10.4 MB  (read only with --enable-source-maps)
#   TypeScript (*.ts, *.mts, *.cts, with *.d.ts)     10.4 ->  6.9 MB  (Node refuses to strip types under node_modules)
#   Markdown (README, CHANGELOG; LICENSE files stay)  6.9 ->  6.4 MB
#   dist/browser, dist/react-native, dist/workerd of the Azure SDK packages
#                                                     6.4 ->  6.2 MB  (export conditions Node never selects)
#   @azure/msal-browser (package.json and LICENSE kept)
#                                                     6.2 ->  4.9 MB  (imported only by @azure/identity's browser flows)
# Usage: trim.sh NODE_MODULES
set -euo pipefail
dir=$1
[ -d "$dir" ] || { echo "trim.sh: $dir is not a folder" >&2; exit 1; }
find "$dir" -type f -name '*.map' -delete
find "$dir" -type f \( -name '*.ts' -o -name '*.mts' -o -name '*.cts' \) -delete
find "$dir" -type f \( -iname '*.md' -o -iname '*.markdown' \) -delete
find "$dir" -path "$dir/@azure/*/dist/*" -type d \( -name browser -o -name react-native -o -name workerd \) -prune -exec rm -rf {} +
if [ -d "$dir/@azure/msal-browser" ]; then
  find "$dir/@azure/msal-browser" -mindepth 1 -maxdepth 1 ! -name package.json ! -name LICENSE -exec rm -rf {} +
fi
find "$dir" -mindepth 1 -type d -empty -delete
