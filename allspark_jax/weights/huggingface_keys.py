"""Key names of SegFormer checkpoints in the Hugging Face `transformers` layout <-> the release's.

Three kinds of checkpoint share one key layout (the names every hub checkpoint and
`save_pretrained` use; transformers >= 5 renames modules in memory only):
  * ``SegformerModel``: the MiT encoder, keys ``encoder.*``;
  * ``SegformerForImageClassification``: ``segformer.encoder.*`` + an ImageNet ``classifier.*``
    (dropped by the encoder import, as the ``head.*`` of the release's ``mit_bX.pth``);
  * ``SegformerForSemanticSegmentation``: ``segformer.encoder.*`` + ``decode_head.*``.

Key layout, stage s = 0..3 (release stage S = s + 1), block j. Linear weights are (out, in) and
conv weights (out, in, kh, kw) in both layouts, so only names change, except for key/value:

  transformers (E: prefix encoder.block.{s}.{j})  release (B: prefix backbone.block{S}.{j})
  encoder.patch_embeddings.{s}.proj             backbone.patch_embed{S}.proj   conv k x k, stride
  encoder.patch_embeddings.{s}.layer_norm       backbone.patch_embed{S}.norm   LN eps 1e-5 in both
  E.layer_norm_1, E.layer_norm_2                B.norm1, B.norm2               LN eps (*)
  E.attention.self.query                        B.attn.q                       (C, C)
  E.attention.self.key, E.attention.self.value  B.attn.kv                      (2C, C) = [key; value]
  E.attention.self.sr                           B.attn.sr                      conv r x r, stride r
  E.attention.self.layer_norm                   B.attn.norm                    LN eps 1e-5 in both
  E.attention.output.dense                      B.attn.proj
  E.mlp.dense1, E.mlp.dwconv.dwconv, E.mlp.dense2   B.mlp.fc1, B.mlp.dwconv.dwconv, B.mlp.fc2
  encoder.layer_norm.{s}                        backbone.norm{S}               LN eps (*)
  decode_head.linear_c.{s}.proj                 decoder.decoder.linear_c{S}.proj   (D, C_S)
  decode_head.linear_fuse (1x1 conv, no bias)   decoder.decoder.linear_fuse.conv   (D, 4D, 1, 1)
  decode_head.batch_norm (weight, bias, running_mean, running_var, num_batches_tracked int64)
                                                decoder.decoder.linear_fuse.bn     BN eps 1e-5
  decode_head.classifier (1x1 conv)             decoder.decoder.linear_pred        (K, D, 1, 1)
  classifier (Linear, ImageNet classes)         backbone.head (the release MiT's classifier)
  (*) 1e-5 in transformers, 1e-6 in the release: `huggingface` says what is checked.

The release's fused ``kv`` Linear splits its output axis as (2, heads, head_dim), keys first;
transformers' ``key`` and ``value`` split theirs as (heads, head_dim) each, so ``kv`` is key's rows
followed by value's rows (weights and biases). The decode head upsamples stages 2-4 to the stage-1
grid (bilinear, align_corners=False) and concatenates ``[c4, c3, c2, c1]`` in both (transformers:
``torch.cat(all_hidden_states[::-1])``), so ``linear_fuse``'s input-channel blocks map unchanged.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from allspark_jax.errors import WeightImportError

ENCODER_PREFIX = "segformer."  # base_model_prefix of the ...ForImageClassification/Segmentation

# Module renames inside a block: transformers -> release (key/value are fused separately).
_BLOCK_MODULES = {
    "layer_norm_1": "norm1", "attention.self.query": "attn.q", "attention.self.sr": "attn.sr",
    "attention.self.layer_norm": "attn.norm", "attention.output.dense": "attn.proj",
    "layer_norm_2": "norm2", "mlp.dense1": "mlp.fc1", "mlp.dwconv.dwconv": "mlp.dwconv.dwconv",
    "mlp.dense2": "mlp.fc2",
}
_HEAD_MODULES = {"linear_fuse": "linear_fuse.conv", "batch_norm": "linear_fuse.bn",
                 "classifier": "linear_pred"}
_KV = re.compile(r"^encoder\.block\.(\d+)\.(\d+)\.attention\.self\.(key|value)\.(weight|bias)$")

# (transformers module, release module, renames of {m}); {s} is a stage, 0-based in transformers
# and 1-based in the release; {b} a block; {m} a sub-module renamed through the table. First match wins.
_MODULE_RULES = (
    ("encoder.patch_embeddings.{s}.proj", "backbone.patch_embed{s}.proj", None),
    ("encoder.patch_embeddings.{s}.layer_norm", "backbone.patch_embed{s}.norm", None),
    ("encoder.block.{s}.{b}.{m}", "backbone.block{s}.{b}.{m}", _BLOCK_MODULES),
    ("encoder.layer_norm.{s}", "backbone.norm{s}", None),
    ("decode_head.linear_c.{s}.proj", "decoder.decoder.linear_c{s}.proj", None),
    ("decode_head.{m}", "decoder.decoder.{m}", _HEAD_MODULES),
    ("classifier", "backbone.head", None),
)
_FIELD_PATTERNS = {"s": r"(?P<s>\d+)", "b": r"(?P<b>\d+)", "m": r"(?P<m>.+)"}


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w)\}", template)  # literal, field, literal, field, ..., literal
    return re.compile("".join(re.escape(p) if i % 2 == 0 else _FIELD_PATTERNS[p]
                              for i, p in enumerate(parts)))


def _map_module(module: str, to_release: bool) -> str | None:
    """A module path (no `segformer.` prefix) in one naming -> the other's; None if it has none."""
    for hf, release, renames in _MODULE_RULES:
        source, target = (hf, release) if to_release else (release, hf)
        if not (m := _template_regex(source).fullmatch(module)):
            continue
        fields = m.groupdict()
        if "s" in fields:
            fields["s"] = int(fields["s"]) + (1 if to_release else -1)
        if "m" in fields:
            table = renames if to_release else {v: k for k, v in renames.items()}
            fields["m"] = table.get(fields["m"])
            if fields["m"] is None:
                return None
        return target.format(**fields)
    return None


def strip_encoder_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    return {k.removeprefix(ENCODER_PREFIX): v for k, v in state.items()}


def to_release_state_dict(hf_state: Mapping[str, np.ndarray], *,
                          source: str = "state dict") -> dict[str, np.ndarray]:
    """transformers state dict -> the release's names (`allspark_jax.weights.release`), arrays unchanged.

    Keys may carry the `segformer.` prefix. key/value pairs are fused into `attn.kv` (key rows
    first). Raises WeightImportError naming every key without a release counterpart and every
    key/value pair that is incomplete or whose halves differ in shape.
    """
    state = strip_encoder_prefix(hf_state)
    out, unknown, kv = {}, [], {}
    for name, value in state.items():
        if m := _KV.fullmatch(name):
            kv.setdefault((m[1], m[2], m[4]), {})[m[3]] = value
            continue
        module, _, leaf = name.rpartition(".")
        target = _map_module(module, to_release=True)
        if target is None:
            unknown.append(name)
        else:
            out[f"{target}.{leaf}"] = value
    bad_pairs = []
    for (s, j, leaf), pair in sorted(kv.items()):
        hf = f"encoder.block.{s}.{j}.attention.self"
        if set(pair) != {"key", "value"} or np.shape(pair["key"]) != np.shape(pair["value"]):
            bad_pairs.append(f"{hf}.{{key,value}}.{leaf}: "
                             + ", ".join(f"{k} {np.shape(v)}" for k, v in sorted(pair.items())))
            continue
        out[f"backbone.block{int(s) + 1}.{j}.attn.kv.{leaf}"] = np.concatenate(
            [np.asarray(pair["key"]), np.asarray(pair["value"])], axis=0)
    if unknown or bad_pairs:
        lines = [f"{source} is not a transformers SegFormer state dict:"]
        if unknown:
            lines.append(f"  keys without a counterpart ({len(unknown)}): " + ", ".join(sorted(unknown)))
        if bad_pairs:
            lines.append(f"  incomplete or mismatched key/value pairs ({len(bad_pairs)}): "
                         + "; ".join(bad_pairs))
        raise WeightImportError("\n".join(lines))
    return out


def from_release_state_dict(release_state: Mapping[str, np.ndarray], *,
                            source: str = "state dict") -> dict[str, np.ndarray]:
    """The release's state dict -> transformers names without the `segformer.` prefix.

    `attn.kv` (2C, ...) is split into key (first C rows) and value. Raises WeightImportError naming
    every key transformers has no place for (the AllSpark module, its memory).
    """
    out, unknown = {}, []
    for name, value in release_state.items():
        module, _, leaf = name.rpartition(".")
        if m := re.fullmatch(r"backbone\.block(\d+)\.(\d+)\.attn\.kv", module):
            hf = f"encoder.block.{int(m[1]) - 1}.{m[2]}.attention.self"
            if np.shape(value)[0] % 2:
                unknown.append(f"{name} (odd output size {np.shape(value)[0]})")
                continue
            key, val = np.split(np.asarray(value), 2, axis=0)
            out[f"{hf}.key.{leaf}"], out[f"{hf}.value.{leaf}"] = key, val
            continue
        target = _map_module(module, to_release=False)
        if target is None:
            unknown.append(name)
        else:
            out[f"{target}.{leaf}"] = value
    if unknown:
        raise WeightImportError(f"{source}: no place in the transformers SegFormer layout for "
                                f"({len(unknown)}): " + ", ".join(sorted(unknown)))
    return out
