"""SegFormer checkpoints in the Hugging Face `transformers` layout (config.json + safetensors).

Accepted sources (`read_checkpoint`): a directory holding ``config.json`` and
``model.safetensors`` (or a sharded ``model.safetensors.index.json``, or, when it has no
safetensors, ``pytorch_model.bin`` read by `allspark_jax.weights.pth_reader`); a ``.safetensors``
file with ``config.json`` beside it; or a hub id (``nvidia/mit-b5``,
``nvidia/segformer-b2-finetuned-ade-512-512``) fetched by `download` with
`huggingface_hub.snapshot_download` when that package is installed. No torch is needed.

The key layout is `allspark_jax.weights.huggingface_keys`'s, the config.json fields
`allspark_jax.weights.huggingface_config`'s. `allspark_jax.weights.loader` decides that a weight
spec is such a checkpoint (and downloads a hub id with `download`).
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from allspark_jax.errors import WeightImportError
from allspark_jax.models.mit import MiTConfig
from allspark_jax.models.segmentor import AllSparkSegmentor, ModelConfig
from allspark_jax.weights import release
from allspark_jax.weights.huggingface_config import (CONFIG_DEFAULTS, CONFIG_NAME, check_config,
                                                     model_config_for, to_config)
from allspark_jax.weights.huggingface_keys import (ENCODER_PREFIX, from_release_state_dict,
                                                   to_release_state_dict)
from allspark_jax.weights.pth_reader import load_pth

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PT_WEIGHTS_NAME = "pytorch_model.bin"
PT_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
_IMAGE_CLASSIFIER = re.compile(r"^classifier\.")


# ----------------------------------------------------------------------------- reading

class Checkpoint(NamedTuple):
    """A transformers SegFormer checkpoint as read from its files."""

    state: dict[str, np.ndarray]  # the transformers layout, keys as in the file, numpy arrays
    config: dict[str, Any]  # config.json, SegformerConfig's defaults filled in
    source: str  # the config.json path (preceded by the hub id for a download), for messages


def weight_files(directory: str | os.PathLike) -> list[str]:
    """The weight files of a checkpoint directory, safetensors preferred; [] if none."""
    directory = os.fspath(directory)
    for single, index in ((WEIGHTS_NAME, WEIGHTS_INDEX_NAME), (PT_WEIGHTS_NAME, PT_WEIGHTS_INDEX_NAME)):
        if os.path.isfile(os.path.join(directory, single)):
            return [os.path.join(directory, single)]
        if os.path.isfile(os.path.join(directory, index)):
            with open(os.path.join(directory, index)) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(directory, s) for s in shards]
    others = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    return others if len(others) == 1 else []


def download(repo_id: str) -> str:
    """The local directory of hub repository `repo_id` (config.json and weights only), fetched with
    `huggingface_hub.snapshot_download`; a WeightImportError naming `repo_id` when that fails."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise WeightImportError(
            f"{repo_id}: no such local file or directory; fetching it as a Hugging Face hub id "
            f"needs huggingface_hub (pip install huggingface_hub), or download the repository "
            f"and pass its directory") from err
    try:
        directory = snapshot_download(repo_id, allow_patterns=[CONFIG_NAME, "*.safetensors",
                                                               WEIGHTS_INDEX_NAME])
        if not weight_files(directory):  # older repositories carry only pytorch_model.bin
            directory = snapshot_download(repo_id, allow_patterns=[
                CONFIG_NAME, PT_WEIGHTS_NAME, PT_WEIGHTS_INDEX_NAME, "pytorch_model-*.bin"])
    except Exception as err:  # offline, unknown repository, gated, ...: all end the import
        raise WeightImportError(
            f"{repo_id}: no such local file or directory, and downloading it from the Hugging "
            f"Face hub failed ({type(err).__name__}: {err}). Offline, download it where there is "
            f"a network (huggingface-cli download {repo_id}) and pass the directory") from err
    return directory


def _read_weights(path: str) -> dict[str, np.ndarray]:
    if path.endswith(".safetensors"):
        try:
            return dict(safetensors.numpy.load_file(path))
        except Exception as err:  # corrupt file, or a dtype numpy lacks (bfloat16)
            raise WeightImportError(f"{path}: cannot read as safetensors with numpy "
                                    f"({type(err).__name__}: {err})") from err
    obj = load_pth(path)
    if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise WeightImportError(f"{path}: expected a state dict (name -> tensor)")
    return obj


def read_checkpoint(path: str | os.PathLike, *, hub_id: str | None = None) -> Checkpoint:
    """Reads a transformers SegFormer checkpoint: a directory, or a `.safetensors` file beside its
    config.json. `hub_id`: the hub repository `path` was downloaded from (`download`), for messages.

    Raises WeightImportError (or FileNotFoundError) naming the path or hub id.
    """
    p = os.fspath(path)
    if os.path.isfile(p):
        if not p.endswith(".safetensors"):
            raise WeightImportError(f"{p}: expected a .safetensors file or a checkpoint directory")
        directory, files = os.path.dirname(os.path.abspath(p)), [p]
    elif os.path.isdir(p):
        directory, files = p, weight_files(p)
        if not files and hub_id is not None:
            raise WeightImportError(f"{hub_id}: the hub repository holds no SegFormer weights "
                                    f"({WEIGHTS_NAME} or {PT_WEIGHTS_NAME})")
        if not files:
            raise WeightImportError(
                f"{p}: no weights found (expected {WEIGHTS_NAME}, {WEIGHTS_INDEX_NAME}, a single "
                f"*.safetensors, {PT_WEIGHTS_NAME} or {PT_WEIGHTS_INDEX_NAME})")
    else:
        raise FileNotFoundError(2, "No such checkpoint file or directory", p)
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise WeightImportError(f"{hub_id or p}: no {CONFIG_NAME} beside the weights (a "
                                f"transformers checkpoint needs it to fix the architecture)")
    with open(config_path) as f:
        config = json.load(f)
    if not isinstance(config, dict):
        raise WeightImportError(f"{config_path}: expected a JSON object")
    state: dict[str, np.ndarray] = {}
    for file in files:
        part = _read_weights(file)
        if dup := sorted(set(part) & set(state)):
            raise WeightImportError(f"{file}: keys repeated across shards: {', '.join(dup)}")
        state.update(part)
    source = f"{hub_id} ({config_path})" if hub_id is not None else config_path
    return Checkpoint(state, {**CONFIG_DEFAULTS, **config}, source)


# ----------------------------------------------------------------------------- import / export

def _shapes_only(tree: Mapping) -> Any:
    """Arrays / ShapeDtypeStructs -> zero-stride numpy views of their shape and dtype (no memory)."""
    return jax.tree.map(lambda x: np.broadcast_to(np.zeros((), x.dtype), x.shape), tree)


def _import(state: Mapping[str, np.ndarray], config: Mapping[str, Any], source: str,
            template: Mapping, model_config, encoder_only: bool) -> dict:
    """Checks config and keys (in the file's names), then converts through the release's names."""
    check_config(config, template if model_config is None else model_config, source,
                 encoder_only=encoder_only)
    if model_config is not None:  # the variables must also be those of that model
        check_config(config, template, source, encoder_only=encoder_only)
    expected = from_release_state_dict(release.to_state_dict(_shapes_only(template)),
                                       source="the model")
    prefix = ENCODER_PREFIX if any(k.startswith(ENCODER_PREFIX) for k in state) else ""
    expected = {(prefix + k if k.startswith("encoder.") else k): v.shape for k, v in expected.items()}
    given = {k: v for k, v in state.items()
             if not (encoder_only and _IMAGE_CLASSIFIER.match(k))}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = [f"{k}: file {tuple(np.shape(given[k]))}, model expects {tuple(expected[k])}"
             for k in sorted(set(expected) & set(given)) if np.shape(given[k]) != expected[k]]
    if missing or unexpected or wrong:
        lines = [f"{source}: the weights do not fit the model:",
                 *release.key_mismatch_lines(missing, unexpected, wrong)]
        if not encoder_only and not any(k.startswith("decode_head.") for k in given):
            lines.append(f"  (no decode_head: {config.get('architectures')} is an encoder "
                         f"checkpoint; load it with loader.load_pretrained_encoder)")
        raise WeightImportError("\n".join(lines))
    return release.from_state_dict(to_release_state_dict(given, source=source), template,
                                   source=source)


def import_variables(checkpoint: Checkpoint, template: Mapping, *,
                     model_config: ModelConfig | None = None) -> dict:
    """A `SegformerForSemanticSegmentation` checkpoint -> Flax variables shaped like `template`.

    `template`: variables (arrays or ShapeDtypeStructs) of a model without AllSpark (`params`,
    `batch_stats`). Pass `model_config` to check the fields shapes cannot show (heads, strides,
    LayerNorm eps).
    """
    return _import(*checkpoint, template, model_config, encoder_only=False)


def import_encoder(checkpoint: Checkpoint, variables: Mapping, *,
                   model_config: ModelConfig | MiTConfig | None = None) -> dict:
    """Replaces `variables['params']['backbone']` with the MiT encoder of a `SegformerModel` or
    `SegformerForImageClassification` checkpoint (its ImageNet `classifier` is ignored)."""
    template = {"params": {"backbone": variables["params"]["backbone"]}}
    loaded = _import(*checkpoint, template, model_config, encoder_only=True)
    return release.with_encoder(variables, loaded["params"]["backbone"])


def segformer(checkpoint: Checkpoint, **overrides) -> tuple[AllSparkSegmentor, dict]:
    """A SegFormer checkpoint -> (model, variables).

    The model reproduces transformers' (`model_config_for`; `overrides` replace ModelConfig fields);
    `model.apply(variables, x, mode="eval")` maps (B, H, W, 3) normalised images to
    (B, H, W, num_labels) logits.
    """
    model_config = model_config_for(checkpoint.config, **overrides)
    model = AllSparkSegmentor(model_config)
    # Without AllSpark nothing depends on the input size: any small input fixes the shapes.
    template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                                                 mode="eval"))
    return model, _import(*checkpoint, template, model_config, encoder_only=False)


def save_checkpoint(variables: Mapping, model_config: ModelConfig | MiTConfig,
                    directory: str | os.PathLike, *, encoder_only: bool = False,
                    id2label: Mapping[int | str, str] | None = None) -> str:
    """Writes `directory/model.safetensors` + `config.json` that transformers' `from_pretrained` reads.

    Whole network (a model without AllSpark, norm_eps 1e-5): `SegformerForSemanticSegmentation`,
    keys `segformer.encoder.*` + `decode_head.*`. `encoder_only`: the encoder of any model as a
    `SegformerModel` (keys `encoder.*`). Returns the directory.
    """
    directory = os.fspath(directory)
    params = variables["params"]
    if encoder_only:
        tree = {"params": {"backbone": params["backbone"]}}
    else:
        if "allspark" in params or (isinstance(model_config, ModelConfig) and model_config.allspark):
            raise WeightImportError("transformers' SegFormer has no AllSpark module: export a model "
                                    "built with allspark=False, or the encoder (encoder_only=True)")
        tree = {c: variables[c] for c in ("params", "batch_stats") if c in variables}
    config = to_config(model_config, encoder_only=encoder_only, id2label=id2label)
    source = f"export to {directory}"
    check_config(config, model_config, source, encoder_only=encoder_only)
    check_config(config, tree, source, encoder_only=encoder_only)  # the variables are that model's
    state = from_release_state_dict(release.to_state_dict(tree), source=source)
    if not encoder_only:
        state = {(ENCODER_PREFIX + k if k.startswith("encoder.") else k): v for k, v in state.items()}
    os.makedirs(directory, exist_ok=True)
    # transformers refuses safetensors files without format metadata.
    # np.array, not np.ascontiguousarray: the latter turns 0-d arrays (num_batches_tracked) into 1-d.
    safetensors.numpy.save_file({k: np.array(v, order="C") for k, v in state.items()},
                                os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    return directory
