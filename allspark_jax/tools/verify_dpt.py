"""Checks the DINOv2 / DPT model against numbers recorded from UniMatch V2's own code.

    python -m allspark_jax.tools.verify_reference tests/data/dpt_tiny.npz tests/data/dpt_tiny_eval.npz

(`verify_reference` hands these files here.) Two kinds of recording, written by
tests/data/record_dinov2.py from UniMatch V2's `DPT` on small perturbed models (PyTorch layouts, NCHW):

  * forward (`meta_json` "models": {name: its encoder, head and layers}): per model `name`, the
    state dict `<name>.pth` beside the file, and cases `{name}_{case}_x` with the intermediate
    layers `{name}_{case}_layer{k}` (normed, class token dropped, (B, h w, D)) and the logits
    `{name}_{case}_logits` of `DPT.forward` (eval); `{name}_compdrop_*` its complementary-dropout
    forward with the drawn mask `_mask` (B, D) and no layers.
  * evaluation (`meta_json` "model" and "sizes"): images `image{i}_x` (1, 3, H, W) and the logits
    `image{i}_logits` of UniMatch V2's `evaluate` ('original' mode, multiplier 14) with the model
    `<model>.pth` beside the file; checked image by image and as one padded batch of all of them
    (the size-bucketed program).

Every case compares at `comparison.FORWARD_RTOL`.
"""
from __future__ import annotations

import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from allspark_jax.errors import ReferenceFileError
from allspark_jax.evaluation import bucketing
from allspark_jax.models.dinov2 import DINOv2, DINOv2Config
from allspark_jax.models.dpt import DPTConfig
from allspark_jax.models.segmentor import dpt_model, init_variables
from allspark_jax.tools.comparison import FORWARD_RTOL, Result, compare, nhwc
from allspark_jax.weights import loader


def is_dpt_recording(meta: dict) -> bool:
    """Whether a recording's `meta_json` is one of this module's two kinds."""
    return "models" in meta or ("model" in meta and "sizes" in meta)


def recorded_model(meta: dict, name: str):
    """The DPT model (`models.segmentor.dpt_model`) of recording `meta`'s model `name` (its
    architecture as record_dinov2.py writes it: UniMatch V2's encoder and head arguments)."""
    m = meta["models"][name] if "models" in meta else meta["model_config"]
    e = m["encoder"]
    encoder = DINOv2Config(embed_dim=e["embed_dim"], depth=e["depth"], num_heads=e["num_heads"],
                           pos_grid=e["img_size"] // 14,
                           ffn="mlp" if e["ffn_layer"] == "mlp" else "swiglu")
    head = DPTConfig(num_classes=meta["nclass"], features=m["head"]["features"],
                     out_channels=tuple(m["head"]["out_channels"]), layers=tuple(m["layers"]))
    return dpt_model(encoder, head)


def _variables(path: str, name: str, model) -> dict:
    """The model's variables from `<name>.pth` beside the recording (strict)."""
    pth = os.path.join(os.path.dirname(os.path.abspath(path)), f"{name}.pth")
    if not os.path.exists(pth):
        raise ReferenceFileError(f"{path}: its model's state dict {pth} is missing")
    p = model.config.backbone.patch_size
    template = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), 2 * p))
    return loader.load_variables(pth, template)


def _forward_cases(path: str, data: dict, meta: dict) -> list[Result]:
    results = []
    for name in meta["models"]:
        model = recorded_model(meta, name)
        v = _variables(path, name, model)
        layers = model.config.dpt.layers

        @jax.jit
        def run(v, x, scale):
            tokens = DINOv2(model.config.backbone).apply({"params": v["params"]["backbone"]}, x,
                                                         layers)
            return tokens, model.apply(v, x, mode="train", feature_scale=scale)

        cases = sorted(k[len(name) + 1:-2] for k in data
                       if k.startswith(name + "_") and k.endswith("_x")
                       and not any(k.startswith(o + "_") and len(o) > len(name)
                                   for o in meta["models"]))
        for case in cases:
            key = f"{name}_{case}"
            scale = data.get(f"{key}_mask")
            tokens, logits = run(v, nhwc(data[f"{key}_x"]),
                                 None if scale is None else jnp.asarray(scale))
            pairs = {"logits": (np.asarray(logits), nhwc(data[f"{key}_logits"]))}
            for k, t in enumerate(tokens):
                if f"{key}_layer{k}" in data:
                    pairs[f"layer{k}"] = (np.asarray(t[:, 1:]), data[f"{key}_layer{k}"])
            results.append(compare(f"{key}", pairs, FORWARD_RTOL))
    return results


def _evaluate_cases(path: str, data: dict, meta: dict) -> list[Result]:
    name = meta["model"]
    forward_meta = _forward_meta(path, name)
    model = recorded_model({**forward_meta, "nclass": meta["nclass"]}, name)
    v = _variables(path, name, model)
    images = [nhwc(data[f"image{i}_x"])[0] for i in range(len(meta["sizes"]))]
    refs = [nhwc(data[f"image{i}_logits"])[0] for i in range(len(meta["sizes"]))]
    logits_fn: Callable = bucketing.make_logits_fn(model)
    alone = {f"image{i}": (np.asarray(model.apply(v, x[None], mode="eval")[0]), r)
             for i, (x, r) in enumerate(zip(images, refs))}
    bucket = tuple(max(x.shape[d] for x in images) for d in (0, 1))
    batch, sizes = bucketing.pad_batch(images, bucket)
    padded = np.asarray(logits_fn({"params": v["params"], "batch_stats": {}}, batch, sizes))
    in_batch = {f"image{i}": (padded[i, :h, :w], r)
                for i, ((h, w), r) in enumerate(zip(sizes, refs))}
    return [compare("evaluate, each image alone", alone, FORWARD_RTOL),
            compare(f"evaluate, one padded batch {bucket[0]}x{bucket[1]}", in_batch,
                    FORWARD_RTOL)]


def _forward_meta(path: str, name: str) -> dict:
    """The architecture of model `name`, from the forward recording that holds it (any `.npz`
    beside `path` whose meta lists it)."""
    folder = os.path.dirname(os.path.abspath(path))
    for f in sorted(os.listdir(folder)):
        if not f.endswith(".npz"):
            continue
        with np.load(os.path.join(folder, f), allow_pickle=False) as rec:
            if "meta_json" not in rec.files:
                continue
            meta = json.loads(str(rec["meta_json"]))
        if name in meta.get("models", {}):
            return {"model_config": meta["models"][name]}
    raise ReferenceFileError(f"{path}: no forward recording beside it describes model {name!r}")


def verify(path: str, data: dict, meta: dict, print_fn=print) -> list[Result]:
    """The cases of a DPT recording (`data`: its arrays, `meta`: its meta_json), printed."""
    if "models" in meta:
        print_fn(f"{path}: UniMatch V2's DPT forward, models {', '.join(meta['models'])}")
        results = _forward_cases(path, data, meta)
    else:
        print_fn(f"{path}: UniMatch V2's evaluate, model {meta['model']}, images "
                 f"{', '.join(f'{h}x{w}' for h, w in meta['sizes'])}")
        results = _evaluate_cases(path, data, meta)
    for r in results:
        print_fn(r.line())
    return results
