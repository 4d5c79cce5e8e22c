#!/usr/bin/env bash
# The DINOv2 figures of BENCHMARKS.md ("DINOv2 with UniMatch V2's DPT head"): one JSON per
# configuration in $1.
#   bash benchmarks/dinov2_tables.sh /tmp/bench_dinov2 && python -m allspark_jax.benchmark --table /tmp/bench_dinov2
# Pascal's config with the DINOv2 encoder at UniMatch V2's crops (518 Pascal / COCO, 798 Cityscapes),
# batch 1 labeled + 1 unlabeled, float32, no pretrained weights (random ones time the same).
# Runs in priority order; each line is independent.
set -u
out=${1:?usage: dinov2_tables.sh OUT_DIR}
mkdir -p "$out"
bench() {  # name, method, size, crop, then flags
    local name=$1 method=$2 size=$3 crop=$4; shift 4
    [ -f "$out/$name.json" ] && return
    echo "== $name $(date +%T)"
    python -m allspark_jax.benchmark --config "configs/pascal.py:1_16,$method" \
        --config.model.encoder=dinov2 --config.model.backbone="$size" \
        --config.data.crop_size="$crop" --config.model.pretrained=None \
        --per_device_batch=1 --json="$out/$name.json" "$@" \
        > "$out/$name.log" 2>&1 || echo "   FAILED (see $out/$name.log)"
}
bench small_518_allspark allspark small 518 --what=matmul,train,infer --steps=3
bench base_518_allspark allspark base 518 --what=matmul,train,infer --steps=2
bench small_518_semi semi small 518 --what=train,infer --steps=3
bench base_518_semi semi base 518 --what=train,infer --steps=2
# MiT-B5 (the release's model) at its Pascal crop beside them, in the same session.
[ -f "$out/mit_b5_513_allspark.json" ] || { echo "== mit_b5_513_allspark $(date +%T)"; \
    python -m allspark_jax.benchmark --config "configs/pascal.py:1_16" --config.model.pretrained=None \
        --per_device_batch=1 --json="$out/mit_b5_513_allspark.json" --what=train,infer --steps=2 \
        > "$out/mit_b5_513_allspark.log" 2>&1 || echo "   FAILED"; }
# XLA's memory estimate of the train step, compiled only: AllSpark's share at both crops.
for size in small base large; do
    for crop in 518 798; do
        for method in allspark semi; do
            bench "compile_${size}_${crop}_${method}" "$method" "$size" "$crop" --what=compile
        done
    done
done
