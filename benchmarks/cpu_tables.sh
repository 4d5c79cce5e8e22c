#!/usr/bin/env bash
# The figures of BENCHMARKS.md ("Train step and inference"): one JSON per configuration in $1.
#   bash benchmarks/cpu_tables.sh /tmp/bench && python -m allspark_jax.benchmark --table /tmp/bench
# Paper crops (Pascal/COCO 513, Cityscapes 801), batch 1 labeled + 1 unlabeled (the paper: 2 + 2 per
# GPU; reduced for a 2-core CPU). Runs in priority order; each line is independent.
set -u
out=${1:?usage: cpu_tables.sh OUT_DIR}
mkdir -p "$out"
bench() {  # name, then flags
    local name=$1; shift
    [ -f "$out/$name.json" ] && return
    echo "== $name $(date +%T)"
    python -m allspark_jax.benchmark --per_device_batch=1 --json="$out/$name.json" "$@" \
        > "$out/$name.log" 2>&1 || echo "   FAILED (see $out/$name.log)"
}
m() { echo "--config.model.backbone=$1 --config.data.crop_size=$2 --config.model.dtype=$3 --config.model.remat=$4"; }
# shellcheck disable=SC2046
{
bench b0_513_f32 $(m b0 513 float32 False) --what=matmul,train,infer,profile --steps=3
bench b5_513_f32 $(m b5 513 float32 False) --what=matmul,train,infer,profile --steps=2 --profile_steps=1
bench b0_513_bf16 $(m b0 513 bfloat16 False) --what=matmul,train,infer --steps=3
bench b0_513_f32_remat $(m b0 513 float32 True) --what=matmul,train,infer --steps=3
bench b0_513_bf16_remat $(m b0 513 bfloat16 True) --what=matmul,train,infer --steps=3
bench b5_513_bf16 $(m b5 513 bfloat16 False) --what=matmul,train,infer --steps=2
bench b5_513_f32_remat $(m b5 513 float32 True) --what=matmul,train,infer --steps=2
bench b5_513_bf16_remat $(m b5 513 bfloat16 True) --what=matmul,train,infer --steps=2
bench b0_801_f32 $(m b0 801 float32 False) --what=matmul,train,infer --steps=3
bench b0_801_bf16 $(m b0 801 bfloat16 False) --what=matmul,train,infer --steps=3
bench b0_801_f32_remat $(m b0 801 float32 True) --what=matmul,train,infer --steps=3
bench b0_801_bf16_remat $(m b0 801 bfloat16 True) --what=matmul,train,infer --steps=3
bench compile_b5_801_f32 $(m b5 801 float32 False) --what=compile
bench compile_b5_801_f32_remat $(m b5 801 float32 True) --what=compile
bench b5_801_bf16 $(m b5 801 bfloat16 False) --what=matmul,train,infer --steps=2
bench b5_801_bf16_remat $(m b5 801 bfloat16 True) --what=matmul,train,infer --steps=2
bench pipeline_b0_513 $(m b0 513 float32 False) --what=pipeline --steps=3
bench scaling_b0_257 $(m b0 257 float32 False) --what=scaling --devices=1,2,4,8 --steps=3
}
