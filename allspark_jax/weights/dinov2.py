"""DINOv2 and UniMatch V2 DPT state dicts <-> Flax parameters (`models.dinov2`, `models.dpt`), both
ways, torch-free and strict.

Layouts (dicts of numpy arrays in PyTorch layout, as `pth.load_pth` or `safetensors.numpy` read them):
  * 'dinov2': facebookresearch's `DinoVisionTransformer` state dict, the keys of
    `dinov2_vit{s,b,l,g}14_pretrain.pth` (what UniMatch V2's `backbone` loads): `cls_token`,
    `pos_embed`, `mask_token`, `patch_embed.proj.*`, `blocks.{i}.{norm1,attn.qkv,attn.proj,ls1.gamma,
    norm2,mlp.fc1,mlp.fc2 | mlp.w12,mlp.w3,ls2.gamma}.*`, `norm.*`;
  * 'transformers': transformers' `Dinov2Model` checkpoints (`facebook/dinov2-*` model.safetensors,
    the hub's key names): `embeddings.{cls_token,mask_token,position_embeddings,
    patch_embeddings.projection.*}`, `encoder.layer.{i}.{norm1,attention.attention.{query,key,value},
    attention.output.dense,layer_scale1.lambda1,norm2,mlp.fc1,mlp.fc2 | mlp.weights_in,
    mlp.weights_out,layer_scale2.lambda1}.*`, `layernorm.*`; the separate query / key / value
    projections are the column blocks [q | k | v] of the Flax `qkv` kernel;
  * UniMatch V2's `DPT` state dict: `backbone.*` in the 'dinov2' layout and `head.*`
    (`projects.{i}`, `resize_layers.{0,1,3}`, `scratch.layer{k}_rn`, `scratch.refinenet{k}.
    {out_conv,resConfUnit{1,2}.conv{1,2}}`, `scratch.output_conv.{0,2}`); a `module.` prefix (its
    DistributedDataParallel training) is dropped when every key has it;
  * the AllSpark segmentor on DINOv2 (`segmentor_from_state_dict`): the DPT's keys plus
    `allspark.*`, the release's AllSpark module (`allspark_jax.weights.release`'s names without its
    `decoder.` prefix), Semantic Memory included.

Layouts: Dense kernels (in, out) <-> Linear weights (out, in); convolution kernels (kh, kw, in, out)
<-> (out, in, kh, kw); the DPT's transposed-convolution kernels (k, k, in, out) <-> ConvTranspose2d
weights (in, out, k, k); LayerNorm scale <-> weight; everything else unchanged.

Import is strict: a missing key, an unexpected key or a shape other than the template's is a
`WeightImportError` that lists every offending key. `config_from_transformers` reads a
transformers config.json into a `DINOv2Config` ('transformers' position interpolation);
`transformers_config` writes one.

Whole files (`allspark_jax.weights.loader` reads them and decides with `layout_of` what a state dict
holds): `import_encoder` puts an encoder state dict into a model's variables and
`variables_from_state_dict` / `variables_to_state_dict` map a whole DINOv2-family model, after
`check_architecture` has compared what the file's shapes show (width, depth, patch, position grid,
feed-forward, DPT widths, class count) with the model's configs in one line naming each field.
Whole models are UniMatch V2's DPT model (method 'semi' / 'supervised') or AllSpark on DINOv2 (its
keys plus `allspark.*`: method 'allspark').
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping

import flax
import numpy as np

from allspark_jax.errors import WeightImportError
from allspark_jax.models.dinov2 import DINOv2Config
from allspark_jax.models.dpt import DPTConfig
from allspark_jax.weights import release
from allspark_jax.weights.release import key_mismatch_lines, strip_prefix, with_encoder

LAYOUTS = ("dinov2", "transformers")
# What a whole DINOv2-family state dict is (`layout_of`): UniMatch V2's DPT model.
UNIMATCH_V2 = "unimatch_v2"
# The Flax name of the encoder's class token: its presence marks a DINOv2 encoder's params (MiT has
# no class token).
CLS_TOKEN = "cls_token"
Path = tuple[str, ...]
# A leaf's rule: its file keys, Flax value -> file values, file values -> Flax value.
Rule = tuple[list[str], Callable[[np.ndarray], list[np.ndarray]],
             Callable[[list[np.ndarray]], np.ndarray]]


def _copy() -> tuple[Callable, Callable]:
    return (lambda v: [v]), (lambda vs: vs[0])


def _leaf_layout(leaf: str, ndim: int, transposed_conv: bool = False) -> tuple[Callable, Callable]:
    """(to file, to Flax) of one leaf: Dense / conv / transposed-conv kernels change layout."""
    if leaf == "kernel" and ndim == 2:
        return (lambda v: [v.T]), (lambda vs: vs[0].T)
    if leaf == "kernel" and ndim == 4 and transposed_conv:
        return (lambda v: [v.transpose(2, 3, 0, 1)]), (lambda vs: vs[0].transpose(2, 3, 0, 1))
    if leaf == "kernel" and ndim == 4:
        return (lambda v: [v.transpose(3, 2, 0, 1)]), (lambda vs: vs[0].transpose(2, 3, 1, 0))
    return _copy()


def _torch_leaf(leaf: str) -> str:
    return {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)


def _bad_path(path: Path, what: str) -> WeightImportError:
    return WeightImportError(f"{what}: no checkpoint key for the Flax parameter {'/'.join(path)}")


def _encoder_rule(path: Path, ndim: int, layout: str) -> Rule:
    """The rule of one encoder leaf (path relative to the encoder's parameters)."""
    head, leaf = path[0], path[-1]
    to_file, to_flax = _leaf_layout(leaf, ndim)
    if layout == "dinov2":
        if len(path) == 1:  # cls_token, pos_embed, mask_token
            return [head], to_file, to_flax
        parts = list(path[:-1])
        if head == "patch_embed":
            parts = ["patch_embed", "proj"]
        elif head.startswith("blocks_"):
            parts = ["blocks", head.removeprefix("blocks_"), *path[1:-1]]
        return [".".join(parts + [_torch_leaf(leaf)])], to_file, to_flax
    top = {"cls_token": "embeddings.cls_token", "mask_token": "embeddings.mask_token",
           "pos_embed": "embeddings.position_embeddings"}
    if len(path) == 1 and head in top:
        return [top[head]], to_file, to_flax
    if head == "patch_embed":
        return [f"embeddings.patch_embeddings.projection.{_torch_leaf(leaf)}"], to_file, to_flax
    if head == "norm":
        return [f"layernorm.{_torch_leaf(leaf)}"], to_file, to_flax
    m = re.fullmatch(r"blocks_(\d+)", head)
    if not m:
        raise _bad_path(path, "transformers layout")
    prefix, middle, tleaf = f"encoder.layer.{m.group(1)}.", path[1:-1], _torch_leaf(leaf)
    if middle == ("attn", "qkv"):
        keys = [f"{prefix}attention.attention.{n}.{tleaf}" for n in ("query", "key", "value")]
        if leaf == "kernel":  # (D, 3D) = [q.T | k.T | v.T]
            return (keys, lambda v: [b.T for b in np.split(v, 3, axis=1)],
                    lambda vs: np.concatenate([b.T for b in vs], axis=1))
        return keys, lambda v: list(np.split(v, 3)), lambda vs: np.concatenate(vs)
    names = {("attn", "proj"): "attention.output.dense", ("ls1",): "layer_scale1",
             ("ls2",): "layer_scale2", ("norm1",): "norm1", ("norm2",): "norm2",
             ("mlp", "fc1"): "mlp.fc1", ("mlp", "fc2"): "mlp.fc2",
             ("mlp", "w12"): "mlp.weights_in", ("mlp", "w3"): "mlp.weights_out"}
    if middle not in names:
        raise _bad_path(path, "transformers layout")
    tleaf = "lambda1" if leaf == "gamma" else tleaf
    return [f"{prefix}{names[middle]}.{tleaf}"], to_file, to_flax


def _head_rule(path: Path, ndim: int) -> Rule:
    """The rule of one DPT head leaf (path relative to the head's parameters)."""
    module, leaf = path[0], path[-1]
    to_file, to_flax = _leaf_layout(leaf, ndim, transposed_conv=module in ("resize_layers_0",
                                                                           "resize_layers_1"))
    m = re.fullmatch(r"(projects|resize_layers|output_conv)_(\d+)", module)
    if m and m.group(1) == "output_conv":
        parts = ["scratch", "output_conv", m.group(2)]
    elif m:
        parts = [m.group(1), m.group(2)]
    elif re.fullmatch(r"layer\d_rn|refinenet\d", module):
        parts = ["scratch", *path[:-1]]
    else:
        raise _bad_path(path, "UniMatch V2 DPT layout")
    return [".".join(["head", *parts, _torch_leaf(leaf)])], to_file, to_flax


def _flat(tree: Mapping) -> dict[Path, Any]:
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


def _dpt_rule(path: Path, ndim: int) -> Rule:
    if path[0] == "backbone":
        keys, to_file, to_flax = _encoder_rule(path[1:], ndim, "dinov2")
        return [f"backbone.{k}" for k in keys], to_file, to_flax
    if path[0] == "head":
        return _head_rule(path[1:], ndim)
    raise _bad_path(path, "UniMatch V2 DPT layout")


def _export(params: Mapping, rule: Callable[[Path, int], Rule]) -> dict[str, np.ndarray]:
    out = {}
    for path, value in _flat(params).items():
        value = np.asarray(value)
        keys, to_file, _ = rule(path, value.ndim)
        for key, v in zip(keys, to_file(value)):
            out[key] = np.ascontiguousarray(v)
    return out


def _import(state: Mapping[str, Any], template: Mapping, rule: Callable[[Path, int], Rule],
            source: str, hint: Callable[[list[str], list[str]], list[str]] | None = None) -> dict:
    expected: dict[str, tuple[Path, int, tuple[int, ...]]] = {}
    rules = {}
    for path, like in _flat(template).items():
        shape = tuple(like.shape)
        keys, to_file, to_flax = rule(path, len(shape))
        rules[path] = (keys, to_flax, like)
        for k, v in zip(keys, to_file(np.zeros(shape, np.float32))):
            expected[k] = v.shape
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(np.shape(state[k]))}, model expects {expected[k]}"
             for k in sorted(set(expected) & set(state)) if tuple(np.shape(state[k])) != expected[k]]
    if missing or unexpected or wrong:
        raise WeightImportError("\n".join([f"{source} does not fit the model:",
                                            *key_mismatch_lines(missing, unexpected, wrong),
                                            *(hint(missing, unexpected) if hint else [])]))
    flat = {}
    for path, (keys, to_flax, like) in rules.items():
        value = to_flax([np.asarray(state[k]) for k in keys])
        flat[path] = np.array(value, dtype=like.dtype, order="C")
    return flax.traverse_util.unflatten_dict(flat)


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown DINOv2 checkpoint layout {layout!r}; expected one of {LAYOUTS}")


def encoder_from_state_dict(state: Mapping[str, Any], template: Mapping, *, layout: str,
                            source: str = "state dict") -> dict:
    """A DINOv2 state dict in `layout` -> the encoder's Flax parameters shaped like `template`
    (the `DINOv2` module's params, arrays or ShapeDtypeStructs). Strict (module docstring)."""
    _check_layout(layout)
    return _import(state, template, lambda p, n: _encoder_rule(p, n, layout), source)


def encoder_to_state_dict(params: Mapping, *, layout: str) -> dict[str, np.ndarray]:
    """The encoder's Flax parameters -> its state dict in `layout` (numpy, PyTorch layout)."""
    _check_layout(layout)
    return _export(params, lambda p, n: _encoder_rule(p, n, layout))


def dpt_from_state_dict(state: Mapping[str, Any], template: Mapping, *,
                        source: str = "state dict") -> dict:
    """UniMatch V2's DPT state dict -> the DPT model's params (`backbone`, `head`) shaped like
    `template`. Strict (module docstring)."""
    return _import(strip_prefix(state, "module."), template, _dpt_rule, source)


def dpt_to_state_dict(params: Mapping) -> dict[str, np.ndarray]:
    """The DPT model's params -> UniMatch V2's DPT state dict (numpy, PyTorch layout)."""
    return _export(params, _dpt_rule)


# The AllSpark segmentor on DINOv2 (`models.segmentor`, model.encoder 'dinov2'): UniMatch V2's DPT
# names for `backbone.*` / `head.*`, the release's AllSpark module under this prefix.
ALLSPARK_PREFIX = "allspark"


def _segmentor_rule(path: Path, ndim: int) -> Rule:
    """The rule of one segmentor leaf; path = (collection, top module, ..., leaf)."""
    collection, top, leaf = path[0], path[1], path[-1]
    if top == "allspark":  # params and the memory collection, the release's module names
        return ([release.torch_name(path[1:], prefix=ALLSPARK_PREFIX)],
                lambda v: [release.torch_layout(v, leaf)],
                lambda vs: release.flax_layout(vs[0], leaf))
    if collection == "params":
        return _dpt_rule(path[1:], ndim)
    raise _bad_path(path, "AllSpark-on-DINOv2 layout")


def _segmentor_hint(missing: list[str], unexpected: list[str]) -> list[str]:
    return release.method_hint(missing, unexpected, prefix=ALLSPARK_PREFIX + ".",
                               without="UniMatch V2's DPT layout")


def segmentor_from_state_dict(state: Mapping[str, Any], template: Mapping, *,
                              source: str = "state dict") -> dict:
    """The DINOv2 segmentor's state dict -> its variables shaped like `template` (`params` and,
    with AllSpark, `memory`; arrays or ShapeDtypeStructs).

    Keys: `backbone.*` and `head.*` as UniMatch V2's DPT (`dpt_from_state_dict`); `allspark.*` the
    release's AllSpark module's own names (those of its `decoder.allspark.*`), the Semantic Memory
    `allspark.attn.kv_queue` (K, C, n) and `allspark.attn.queue_ptr` (K,) included. A `module.`
    prefix is dropped when every key has it. Strict (module docstring); a mismatch of exactly the
    `allspark.*` keys names the config.method that fits. The template's empty collections (the
    DPT head's `batch_stats`) are kept, empty.
    """
    template = {k: v for k, v in template.items() if k != "intermediates"}
    variables = _import(strip_prefix(state, "module."), template, _segmentor_rule, source,
                        _segmentor_hint)
    return {k: variables.get(k, {}) for k in template}


def segmentor_to_state_dict(variables: Mapping) -> dict[str, np.ndarray]:
    """The DINOv2 segmentor's variables (params, memory) -> its state dict (numpy, PyTorch layout;
    write pointers int64)."""
    return _export({k: v for k, v in variables.items() if k != "intermediates"}, _segmentor_rule)


# transformers' Dinov2Config fields that fix the architecture, and the DINOv2Config field each is.
_HF_FIELDS = {"hidden_size": "embed_dim", "num_hidden_layers": "depth",
              "num_attention_heads": "num_heads", "mlp_ratio": "mlp_ratio",
              "patch_size": "patch_size", "num_channels": "in_channels", "qkv_bias": "qkv_bias",
              "layerscale_value": "layer_scale_init", "layer_norm_eps": "norm_eps"}


def config_from_transformers(config: Mapping[str, Any], source: str = "config.json",
                             **overrides) -> DINOv2Config:
    """A transformers `Dinov2Config` (config.json as a dict) -> `DINOv2Config` with the
    'transformers' position interpolation. Architectures this encoder does not compute (another
    model type, activation, registers, non-square sizes) are a WeightImportError naming the field."""
    if config.get("model_type") != "dinov2":
        raise WeightImportError(f"{source}: model_type {config.get('model_type')!r}; expected "
                                "'dinov2' (transformers' Dinov2Model)")
    if config.get("hidden_act", "gelu") != "gelu":
        raise WeightImportError(f"{source}: hidden_act {config['hidden_act']!r}; the DINOv2 "
                                "encoder computes 'gelu' (exact)")
    sizes = {}
    for field in ("image_size", "patch_size"):
        value = config.get(field, {"image_size": 224, "patch_size": 14}[field])
        if isinstance(value, (list, tuple)):
            if len(set(value)) != 1:
                raise WeightImportError(f"{source}: {field} {value}; expected a square size")
            value = value[0]
        sizes[field] = int(value)
    fields = {ours: config[theirs] for theirs, ours in _HF_FIELDS.items() if theirs in config}
    fields["patch_size"] = sizes["patch_size"]
    fields["pos_grid"] = sizes["image_size"] // sizes["patch_size"]
    fields["ffn"] = "swiglu" if config.get("use_swiglu_ffn", False) else "mlp"
    try:
        return DINOv2Config(**{**fields, "pos_interpolation": "transformers", **overrides})
    except (TypeError, ValueError) as e:
        raise WeightImportError(f"{source}: {e}") from e


def transformers_config(config: DINOv2Config) -> dict[str, Any]:
    """`DINOv2Config` -> a transformers `Dinov2Model` config.json dict (the architecture fields;
    transformers fills the rest with its defaults). transformers interpolates position embeddings
    its own way ('transformers'), whatever `config.pos_interpolation` is."""
    out = {theirs: getattr(config, ours) for theirs, ours in _HF_FIELDS.items()}
    out.update(model_type="dinov2", architectures=["Dinov2Model"], hidden_act="gelu",
               image_size=config.pos_grid * config.patch_size,
               use_swiglu_ffn=config.ffn == "swiglu", use_mask_token=True)
    return out


# ------------------------------------------------------------------------------- whole files

def holds_dinov2(variables: Mapping) -> bool:
    """Whether `variables` (with `params/backbone`) are those of a DINOv2-encoder model."""
    return CLS_TOKEN in variables.get("params", {}).get("backbone", {})


def layout_of(state: Mapping[str, Any]) -> str | None:
    """What a state dict (a `module.` prefix dropped) holds, by its keys: 'dinov2' (a
    facebookresearch encoder: `cls_token`, `patch_embed.proj.weight`), 'transformers' (a
    `Dinov2Model`: `embeddings.cls_token`), `UNIMATCH_V2` (a whole model: `backbone.cls_token` and
    `backbone.patch_embed.proj.weight`), or None (no DINOv2 state dict)."""
    keys = set(strip_prefix(state, "module."))
    if {"backbone.cls_token", "backbone.patch_embed.proj.weight"} <= keys:
        return UNIMATCH_V2
    if {"cls_token", "patch_embed.proj.weight"} <= keys:
        return "dinov2"
    if "embeddings.cls_token" in keys:
        return "transformers"
    return None


def _shape(state: Mapping[str, Any], key: str) -> tuple[int, ...] | None:
    return tuple(np.shape(state[key])) if key in state else None


# Keys whose shapes show the encoder's architecture, in each layout (block keys after the block's
# prefix, `_BLOCK` matching that prefix).
_SHAPE_KEYS = {
    "dinov2": dict(cls="cls_token", pos="pos_embed", patch="patch_embed.proj.weight",
                   w12="mlp.w12.weight", fc1="mlp.fc1.weight", qkv="attn.qkv.weight",
                   qkv_bias="attn.qkv.bias"),
    "transformers": dict(cls="embeddings.cls_token", pos="embeddings.position_embeddings",
                         patch="embeddings.patch_embeddings.projection.weight",
                         w12="mlp.weights_in.weight", fc1="mlp.fc1.weight",
                         qkv="attention.attention.query.weight",
                         qkv_bias="attention.attention.query.bias"),
}
_BLOCK = {"dinov2": r"blocks\.(\d+)\.", "transformers": r"encoder\.layer\.(\d+)\."}


def _encoder_fields(state: Mapping[str, Any], prefix: str, layout: str) -> dict[str, Any]:
    """{DINOv2Config field: value} that an encoder state dict's shapes show (keys in `layout`
    under `prefix`); fields whose keys are absent are left out (the key check names those)."""
    names, fields = _SHAPE_KEYS[layout], {}
    if (cls := _shape(state, prefix + names["cls"])) is not None:
        fields["embed_dim"] = cls[-1]
    if (proj := _shape(state, prefix + names["patch"])) is not None and len(proj) == 4:
        fields["patch_size"], fields["in_channels"] = proj[2], proj[1]
    if (pos := _shape(state, prefix + names["pos"])) is not None and len(pos) == 3:
        side = int(round(math.sqrt(pos[1] - 1)))
        fields["pos_grid"] = side if side * side == pos[1] - 1 else f"{pos[1] - 1} tokens"
    block = re.escape(prefix) + _BLOCK[layout]
    blocks = {int(m.group(1)) for k in state if (m := re.match(block, k))}
    if blocks:
        fields["depth"] = max(blocks) + 1
    b0 = next((k[:m.end()] for k in state if (m := re.match(block, k)) and m.group(1) == "0"),
              None)
    if b0 is not None and b0 + names["w12"] in state:
        fields["ffn"], fields["ffn_hidden"] = "swiglu", _shape(state, b0 + names["w12"])[0] // 2
    elif b0 is not None and b0 + names["fc1"] in state:
        fields["ffn"], fields["ffn_hidden"] = "mlp", _shape(state, b0 + names["fc1"])[0]
    if b0 is not None and b0 + names["qkv"] in state:
        fields["qkv_bias"] = b0 + names["qkv_bias"] in state
    return fields


def _head_fields(state: Mapping[str, Any]) -> dict[str, Any]:
    """{DPTConfig field: value} that UniMatch V2's DPT state dict's `head.*` shapes show."""
    fields = {}
    if (out := _shape(state, "head.scratch.output_conv.2.weight")) is not None:
        fields["num_classes"] = out[0]
    if (rn := _shape(state, "head.scratch.layer1_rn.weight")) is not None:
        fields["features"] = rn[0]
    projects = [_shape(state, f"head.projects.{i}.weight") for i in range(4)]
    if all(p is not None for p in projects):
        fields["out_channels"] = tuple(p[0] for p in projects)
    return fields


def check_architecture(state: Mapping[str, Any], source: str, *, encoder: DINOv2Config,
                       head: DPTConfig | None = None, prefix: str = "",
                       layout: str = "dinov2") -> None:
    """Compares what a state dict's shapes show (the encoder's keys in `layout` under `prefix`;
    with `head`, UniMatch V2's `head.*` too) with the model's configs; a WeightImportError of one
    line naming `source` and each differing field otherwise. Fields the shapes do not show (heads,
    the DPT's layers read) are not compared."""
    ours = {"embed_dim": encoder.embed_dim, "patch_size": encoder.patch_size,
            "in_channels": encoder.in_channels, "pos_grid": encoder.pos_grid,
            "depth": encoder.depth, "ffn": encoder.ffn, "ffn_hidden": encoder.ffn_hidden,
            "qkv_bias": encoder.qkv_bias}
    theirs = _encoder_fields(state, prefix, layout)
    if head is not None:
        ours.update(num_classes=head.num_classes, features=head.features,
                    out_channels=tuple(head.out_channels))
        theirs.update(_head_fields(state))
    diffs = [f"{field} {theirs[field]} in the file, {value} in the model"
             for field, value in ours.items() if field in theirs and theirs[field] != value]
    if diffs:
        what = "DINOv2 model" if head is not None else "DINOv2 encoder"
        raise WeightImportError(f"{source}: the {what} does not fit the model's: "
                                + "; ".join(diffs))


def import_encoder(state: Mapping[str, Any], variables: Mapping, *, layout: str,
                   source: str = "state dict", encoder: DINOv2Config | None = None) -> dict:
    """`variables` with `params/backbone` replaced by the DINOv2 encoder state dict `state` in
    `layout` (strict; with `encoder`, its shapes are first compared with it:
    `check_architecture`)."""
    _check_layout(layout)
    if encoder is not None:
        check_architecture(state, source, encoder=encoder, layout=layout)
    params = encoder_from_state_dict(state, variables["params"]["backbone"], layout=layout,
                                     source=source)
    return with_encoder(variables, params)


def variables_from_state_dict(state: Mapping[str, Any], template: Mapping, *,
                              source: str = "state dict", encoder: DINOv2Config | None = None,
                              head: DPTConfig | None = None) -> dict:
    """A whole DINOv2-family model's state dict -> Flax variables shaped like `template` (arrays or
    ShapeDtypeStructs: `params` and the model's other collections, as `init_variables` makes them).

    UniMatch V2's DPT model (`backbone.*` + `head.*`) into a model without AllSpark, or AllSpark on
    DINOv2 (the same plus `allspark.*`, Semantic Memory included) into a model with it
    (`segmentor_from_state_dict`; a `module.` prefix dropped; a mismatch of exactly the AllSpark
    keys names the config.method that fits). With `encoder` and `head` (the model's configs) the
    shapes are first compared with them (`check_architecture`). Strict (module docstring).
    """
    state = strip_prefix(state, "module.")
    if encoder is not None:
        check_architecture(state, source, encoder=encoder, head=head, prefix="backbone.")
    return segmentor_from_state_dict(state, template, source=source)


def variables_to_state_dict(variables: Mapping) -> dict[str, np.ndarray]:
    """A DINOv2-family model's variables -> its whole state dict (numpy, PyTorch layout): UniMatch
    V2's DPT model's (`backbone.*` + `head.*`, what its `DPT.load_state_dict` takes), plus
    `allspark.*` for AllSpark on DINOv2 (`segmentor_to_state_dict`)."""
    return segmentor_to_state_dict({k: v for k, v in variables.items() if k != "batch_stats"
                                    or _flat(v)})
