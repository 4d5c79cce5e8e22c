#!/usr/bin/env bash
# Prepares benchmarks/gpu/run.sh's run on a GPU machine without network access; run it here, in the
# repository, once:
#     bash benchmarks/gpu/prepare.sh /path/to/the/release
# It fills two folders that git ignores and that the run carries beside the checkout:
#   .release/  the release's bench_release.py, shim/ and allspark_release/ (copied from the folder
#              given; never committed);
#   .whl/      wheels of the pure-Python packages the GPU machine's Python 3.12 lacks (ml_collections:
#              its needs, absl-py and PyYAML, are there), which run.sh installs before it starts.
set -euo pipefail
src=${1:?usage: prepare.sh RELEASE_DIR (the folder holding bench_release.py, shim/, allspark_release/)}
cd "$(dirname "$0")/../.."
for p in bench_release.py shim allspark_release; do
    [ -e "$src/$p" ] || { echo "prepare.sh: $src/$p missing; expected the release's folder" >&2; exit 2; }
done
rm -rf .release && mkdir .release
cp -r "$src/bench_release.py" "$src/shim" "$src/allspark_release" .release/
chmod -R u+w .release
find .release -name __pycache__ -prune -exec rm -rf {} +
mkdir -p .whl
# Pure-Python wheels: the platform flags only satisfy pip's --python-version check.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "ml_collections==${ML_COLLECTIONS_VERSION:-1.1.0}"
ls -l .release .whl
du -sh .release .whl
