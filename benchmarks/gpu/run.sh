#!/usr/bin/env bash
# The GPU run: versions, the verifier at 'highest' and 'default', the release against ours on the
# same GPU at 513 px, the matmul peak; at most about 9 minutes on one GPU (benchmarks/gpu/run.py
# says what, in which order). Prepare once where pip reaches PyPI:
#     bash benchmarks/gpu/prepare.sh /path/to/the/release     # fills .release/ and .whl/
# then on the GPU machine, in the repository, with .release and .whl beside it:
#     bash benchmarks/gpu/run.sh                              # results in $OUT (or /tmp/allspark_gpu)
# Extra arguments go to run.py (e.g. --scale tiny --release_device cpu for a CPU dry run).
# ALLSPARK_GPU_CACHE: the persistent compilation cache (kept between runs on one machine, so a
# rerun skips compiling; default /tmp/allspark_jax_cache).
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/allspark_gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
if ! "$py" -c "import ml_collections" 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "run.sh: ml_collections is missing and .whl/ holds no wheels: run benchmarks/gpu/prepare.sh" >&2
        exit 2
    fi
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
export JAX_COMPILATION_CACHE_DIR=${ALLSPARK_GPU_CACHE:-/tmp/allspark_jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0.5
"$py" benchmarks/gpu/run.py --out "$out" "$@" 2>&1 | tee "$out/log.txt"
