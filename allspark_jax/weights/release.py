"""The release's state-dict layout: Flax variables <-> the official PyTorch state dicts.

Flax module names mirror the release's, so a parameter's PyTorch name follows from its Flax path
by a few renames (`block1_0` -> `block1.0`, `allspark` -> `decoder.allspark`, ...) and its value by a
layout change (Dense kernels (in, out) <-> Linear weights (out, in); conv kernels (kh, kw, in, out) <->
(out, in, kh, kw)). Import is strict: a missing key, an unexpected key or a wrong shape is an error
that lists every offending key.

One layout serves each of the release's trainers: AllSpark's (`decoder.allspark.*` and the Semantic
Memory), and the baselines' (`semidec_base.SemiDecoder`: the same names without
`decoder.allspark.*`, for a model of config.method 'semi' / 'supervised'); SegFormer's ImageNet
encoders (`mit_b0.pth` ... `mit_b5.pth`) hold the encoder's names without the `backbone.` prefix
(`import_encoder`; their classifier `head.*` is ignored). The files these come in are read and
written by `allspark_jax.weights.release_files`; `allspark_jax.weights.loader` decides the source.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import flax
import numpy as np

from allspark_jax.errors import WeightImportError

# Flax top-level module -> prefix of the release's state dict.
_TOP = {"backbone": "backbone", "allspark": "decoder.allspark", "head": "decoder.decoder"}
# Flax module names that are nested one level deeper in the release (nn.Sequential / wrapper).
_SEGMENT_RENAMES = {"map_in": "map_in.0", "map_out": "map_out.0", "dwconv": "dwconv.dwconv"}
_LEAF_RENAMES = {"kernel": "weight", "scale": "weight", "mean": "running_mean",
                 "var": "running_var"}
_INT64_LEAVES = ("num_batches_tracked", "queue_ptr")
ENCODER_IGNORED = re.compile(r"^head\.")


def key_mismatch_lines(missing, unexpected, wrong) -> list[str]:
    """The indented report lines of a WeightImportError: each non-empty list, counted."""
    return [f"  {title} ({len(items)}): " + ", ".join(items)
            for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                 ("shape mismatches", wrong)) if items]


def torch_name(path: tuple[str, ...], prefix: str | None = None) -> str:
    """('backbone', 'block1_0', 'attn', 'q', 'kernel') -> 'backbone.block1.0.attn.q.weight'.

    `prefix` replaces the release's prefix of the top-level module (`decoder.allspark` for
    'allspark'): the same module's names under another model's prefix."""
    top, *middle, leaf = path
    parts = [_TOP[top] if prefix is None else prefix]
    for seg in middle:
        seg = _SEGMENT_RENAMES.get(seg, seg)
        parts.append(re.sub(r"^(block\d+)_(\d+)$", r"\1.\2", seg))
    parts.append(_LEAF_RENAMES.get(leaf, leaf))
    return ".".join(parts)


def torch_layout(value: np.ndarray, leaf: str) -> np.ndarray:
    """A Flax leaf named `leaf` -> its PyTorch layout (and int64 for counters and pointers)."""
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    if leaf in _INT64_LEAVES:
        return value.astype(np.int64)
    return value


def flax_layout(value: np.ndarray, leaf: str) -> np.ndarray:
    """A PyTorch tensor -> the Flax layout of the leaf `leaf` (dtype unchanged)."""
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    return value


def _to_flax_layout(value: np.ndarray, leaf: str, like: Any) -> np.ndarray:
    return np.array(flax_layout(value, leaf), dtype=like.dtype, order="C")


def flat_leaves(variables: Mapping) -> dict[tuple[str, ...], Any]:
    """{(collection, module..., leaf): array} over params, batch_stats and memory."""
    return {k: v for k, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(variables)).items()
            if k[0] != "intermediates"}


def to_state_dict(variables: Mapping) -> dict[str, np.ndarray]:
    """Flax variables (params, batch_stats, memory) -> the release's state dict (numpy)."""
    return {torch_name(path[1:]): torch_layout(np.asarray(v), path[-1])
            for path, v in flat_leaves(variables).items()}


def strip_prefix(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def from_state_dict(state: Mapping[str, np.ndarray], template: Mapping, *, source: str = "state dict",
                    name_prefix: str = "", ignore: re.Pattern | None = None) -> dict:
    """The release's state dict -> Flax variables shaped like `template`.

    Args:
      state: {torch name: array}; a `module.` prefix (DDP) is stripped when every key has it.
      template: Flax variables (arrays or ShapeDtypeStructs) giving the tree, shapes and dtypes.
      source: where `state` came from, for error messages.
      name_prefix: prefix that the template's names carry but the file's do not (e.g. "backbone.").
      ignore: file keys matching this pattern are dropped (e.g. a classifier head).
    Raises:
      WeightImportError listing missing keys, unexpected keys and shape mismatches.
    """
    state = strip_prefix(state, "module.")
    expected = {}
    for path, like in flat_leaves(template).items():
        name = torch_name(path[1:])
        if not name.startswith(name_prefix):
            raise WeightImportError(f"{source}: template leaf {'/'.join(path)} lies outside "
                                    f"{name_prefix!r}")
        expected[name[len(name_prefix):]] = (path, like)
    given = {k: v for k, v in state.items() if not (ignore and ignore.search(k))}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    flat, wrong = {}, []
    for name in sorted(set(expected) & set(given)):
        path, like = expected[name]
        value = _to_flax_layout(np.asarray(given[name]), path[-1], like)
        if value.shape != tuple(like.shape):
            wrong.append(f"{name}: file {tuple(np.shape(given[name]))}, model expects "
                         f"{tuple(torch_layout(np.zeros(like.shape), path[-1]).shape)}")
        flat[path] = value
    if missing or unexpected or wrong:
        raise WeightImportError("\n".join([f"{source} does not fit the model:",
                                            *key_mismatch_lines(missing, unexpected, wrong),
                                            *method_hint(missing, unexpected)]))
    return flax.traverse_util.unflatten_dict(flat)


def method_hint(missing: list[str], unexpected: list[str],
                prefix: str = _TOP["allspark"] + ".",
                without: str = "the release's semi / supervised baselines, "
                               "semidec_base.SemiDecoder") -> list[str]:
    """A line naming config.method when the mismatch is exactly the AllSpark module's keys (those
    starting with `prefix`); `without` names the layout of the model without them."""
    if unexpected and all(k.startswith(prefix) for k in unexpected) and not missing:
        return ["  the file holds an AllSpark model: use config.method='allspark'"]
    if missing and all(k.startswith(prefix) for k in missing) and not unexpected:
        return [f"  the file holds a model without AllSpark ({without}): use config.method='semi' "
                "or 'supervised'"]
    return []


def import_encoder(state: Mapping[str, np.ndarray], variables: Mapping, *,
                   source: str = "state dict") -> dict:
    """`variables` with `params/backbone` replaced by a SegFormer `mit_bX.pth` encoder's state dict
    (encoder keys without prefix; its classifier `head.*` is ignored); strict as `from_state_dict`."""
    template = {"params": {"backbone": variables["params"]["backbone"]}}
    loaded = from_state_dict(state, template, source=source, name_prefix="backbone.",
                             ignore=ENCODER_IGNORED)
    return with_encoder(variables, loaded["params"]["backbone"])


def with_encoder(variables: Mapping, backbone: Mapping) -> dict:
    """`variables` (unfrozen) with `params/backbone` replaced by `backbone`."""
    variables = flax.core.unfreeze(variables)
    variables["params"] = {**variables["params"], "backbone": backbone}
    return variables


def encoder_state_dict(variables: Mapping) -> dict[str, np.ndarray]:
    """The encoder of `variables` in `mit_bX.pth`'s names (no `backbone.` prefix)."""
    return strip_prefix(to_state_dict({"params": {"backbone": variables["params"]["backbone"]}}),
                        "backbone.")


def official_checkpoint(variables: Mapping, *, epoch: int = 0,
                        previous_best: float = 0.0) -> dict:
    """The release's `latest.pth` object: `model` (keys prefixed `module.`, as DDP saves them),
    an empty `optimizer`, `epoch`, `best_epoch`, `previous_best`."""
    model = {f"module.{k}": v for k, v in to_state_dict(variables).items()}
    return {"model": model, "optimizer": {"state": {}, "param_groups": []}, "epoch": epoch,
            "best_epoch": epoch, "previous_best": previous_best}
