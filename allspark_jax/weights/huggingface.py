"""SegFormer and DINOv2 checkpoints in the Hugging Face `transformers` layout (config.json +
safetensors).

Accepted sources (`read_checkpoint`): a directory holding ``config.json`` and
``model.safetensors`` (or a sharded ``model.safetensors.index.json``, or, when it has no
safetensors, ``pytorch_model.bin`` read by `allspark_jax.weights.pth_reader`); a ``.safetensors``
file with ``config.json`` beside it; or a hub id (``nvidia/mit-b5``,
``nvidia/segformer-b2-finetuned-ade-512-512``) fetched by `download` with
`huggingface_hub.snapshot_download` when that package is installed. No torch is needed.

The key layout is `allspark_jax.weights.huggingface_keys`'s. `allspark_jax.weights.loader`
decides that a weight spec is such a checkpoint (and downloads a hub id with `download`).

config.json is read as transformers builds the network from it (`model_config_for`), compared with
a model (`check_config`) and written for a model (`to_config`). A checkpoint whose config.json has
`model_type` 'dinov2' is a transformers `Dinov2Model` (`is_dinov2`): its encoder goes into a DINOv2
model with `import_dinov2_encoder` and is written by `save_checkpoint(..., encoder_only=True)` for
a DINOv2 model (key names and config fields: `allspark_jax.weights.dinov2`); the rest of this
docstring is about SegFormer.

Semantics (transformers' modeling_segformer.py, 4.x and 5.x), and what is checked:
  * LayerNorm eps: transformers builds every LayerNorm with torch's default eps 1e-5 and never reads
    ``config.layer_norm_eps``; the release uses 1e-6 in the blocks and stage norms
    (`MiTConfig.norm_eps`). Importing or exporting a whole network requires the model's
    ``norm_eps`` to be 1e-5 (`model_config_for` builds such a model); the encoder import does not:
    it is an initialisation (the release fine-tunes NVIDIA's ImageNet weights, the same as in
    ``mit_bX.pth``, with 1e-6).
  * ``hidden_act`` must be ``gelu`` (exact erf GELU, as the release); ``hidden_dropout_prob`` and
    ``attention_probs_dropout_prob`` must be 0 (the MiT here has no such dropout); ``model_type``
    must be ``segformer``. Anything else is rejected.
  * ``reshape_last_stage`` only changes the layout transformers returns the stage-4 map in (and, if
    false, makes its decode head assume a square map); weights and values for square inputs are
    the same, so either value is accepted.
  * Logits: transformers' ``SegformerForSemanticSegmentation`` returns the head's output at the
    stage-1 (1/4) resolution; `AllSparkSegmentor` returns it upsampled to the input size
    (bilinear, align_corners=False), as transformers' loss does.
  * Training-only fields (``drop_path_rate``, ``classifier_dropout_prob`` - transformers drops
    elementwise there, the release whole channels -, ``semantic_loss_ignore_index``) are not
    compared; export writes the model's.
  * Architecture: ``hidden_sizes``, ``depths``, ``num_attention_heads``, ``sr_ratios``,
    ``mlp_ratios``, ``patch_sizes``, ``strides``, ``num_encoder_blocks``, ``num_channels`` and, for a
    whole network, ``decoder_hidden_size`` and the class count (``num_labels`` or
    ``len(id2label)``) are compared with the model, each mismatch named. Given only variables,
    the fields their shapes determine are compared (all but heads, strides and the LayerNorm
    eps); pass a `ModelConfig` to compare all. Then the keys: every missing, unexpected or
    mis-shaped key is listed, in the file's names, when the weights are imported. Absent config fields
    take `SegformerConfig`'s defaults, as in transformers.
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
from allspark_jax.models.dinov2 import DINOv2, DINOv2Config
from allspark_jax.models.mit import MiTConfig
from allspark_jax.models.segmentor import AllSparkSegmentor, ModelConfig
from allspark_jax.weights import dinov2, release
from allspark_jax.weights.huggingface_keys import (ENCODER_PREFIX, from_release_state_dict,
                                                   to_release_state_dict)
from allspark_jax.weights.pth_reader import load_pth

# ------------------------------------------------------------------------------- config.json

CONFIG_NAME = "config.json"
# LayerNorm eps of transformers' blocks and stage norms (torch's default; config ignored).
TRANSFORMERS_NORM_EPS = 1e-5
# SegformerConfig's defaults (identical in transformers 4.x and 5.x): absent fields take these.
CONFIG_DEFAULTS: dict[str, Any] = {
    "num_channels": 3, "num_encoder_blocks": 4, "depths": [2, 2, 2, 2], "sr_ratios": [8, 4, 2, 1],
    "hidden_sizes": [32, 64, 160, 256], "patch_sizes": [7, 3, 3, 3], "strides": [4, 2, 2, 2],
    "num_attention_heads": [1, 2, 5, 8], "mlp_ratios": [4, 4, 4, 4], "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "classifier_dropout_prob": 0.1,
    "initializer_range": 0.02, "drop_path_rate": 0.1, "layer_norm_eps": 1e-6,
    "decoder_hidden_size": 256, "semantic_loss_ignore_index": 255, "reshape_last_stage": True,
}
STAGE_FIELDS = ("hidden_sizes", "depths", "num_attention_heads", "sr_ratios", "mlp_ratios",
                "patch_sizes", "strides")


def num_labels(config: Mapping[str, Any], source: str = CONFIG_NAME) -> int:
    """The class count as transformers derives it: `num_labels`, else len(id2label), else 2."""
    id2label = config.get("id2label")
    n = config.get("num_labels")
    if n is not None and id2label and len(id2label) != n:
        raise WeightImportError(f"{source}: num_labels = {n} but id2label has {len(id2label)} entries")
    return int(n) if n is not None else (len(id2label) if id2label else 2)


def _check_semantics(config: Mapping[str, Any], source: str) -> list[str]:
    """What transformers would compute differently from our modules, one line per field."""
    errors = []
    if config.get("model_type") != "segformer":
        errors.append(f"model_type = {config.get('model_type')!r}, expected 'segformer'")
    if config["hidden_act"] != "gelu":
        errors.append(f"hidden_act = {config['hidden_act']!r}: only 'gelu' (exact, erf) is "
                      f"implemented, as in the release")
    for field in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        if config[field] != 0:
            errors.append(f"{field} = {config[field]}: the MiT here has no such dropout (0 in "
                          f"SegFormer and the release)")
    n = config["num_encoder_blocks"]
    for field in STAGE_FIELDS:
        v = config[field]
        if not (isinstance(v, (list, tuple)) and len(v) == n
                and all(isinstance(x, (int, float)) and x == int(x) for x in v)):
            errors.append(f"{field} = {v!r}: expected {n} integers (num_encoder_blocks)")
    return errors


def _model_fields(model: ModelConfig | MiTConfig, encoder_only: bool) -> dict[str, Any]:
    """{config.json field: the model's value} for a ModelConfig / MiTConfig."""
    if isinstance(model, MiTConfig):
        if not encoder_only:
            raise TypeError("a whole-network check needs a ModelConfig, got a MiTConfig")
        mit = model
    else:
        mit = model.backbone
    fields = {
        "num_encoder_blocks": len(mit.embed_dims), "hidden_sizes": tuple(mit.embed_dims),
        "depths": tuple(mit.depths), "num_attention_heads": tuple(mit.num_heads),
        "sr_ratios": tuple(mit.sr_ratios), "mlp_ratios": tuple(mit.mlp_ratios),
        "patch_sizes": tuple(mit.patch_kernels), "strides": tuple(mit.patch_strides),
        "num_channels": 3,
        # Not config.json fields: properties transformers' SegFormer always has.
        "query/key/value biases": mit.qkv_bias,
    }
    if not encoder_only:
        fields.update({
            "decoder_hidden_size": model.decoder_dim, "num_labels": model.num_classes,
            "AllSpark module": model.allspark,
            "LayerNorm eps of blocks and stages": mit.norm_eps,
        })
    return fields


def _variables_fields(variables: Mapping, encoder_only: bool) -> dict[str, Any]:
    """{config.json field: value} for what the variables' shapes determine (not heads, strides)."""
    params = variables["params"]
    enc = params["backbone"]
    n = sum(1 for k in enc if re.fullmatch(r"patch_embed\d+", k))
    hidden, depths, sr, mlp, patch = [], [], [], [], []
    for s in range(1, n + 1):
        kernel = enc[f"patch_embed{s}"]["proj"]["kernel"]  # (k, k, in, out)
        hidden.append(int(kernel.shape[3]))
        patch.append(int(kernel.shape[0]))
        depths.append(sum(1 for k in enc if re.fullmatch(rf"block{s}_\d+", k)))
        if depths[-1]:
            attn = enc[f"block{s}_0"]["attn"]
            sr.append(int(attn["sr"]["kernel"].shape[0]) if "sr" in attn else 1)
            mlp.append(int(enc[f"block{s}_0"]["mlp"]["fc1"]["kernel"].shape[1]) // hidden[-1])
    fields = {"num_encoder_blocks": n, "hidden_sizes": tuple(hidden), "depths": tuple(depths),
              "patch_sizes": tuple(patch),
              "num_channels": int(enc["patch_embed1"]["proj"]["kernel"].shape[2])}
    if all(depths):
        fields.update(sr_ratios=tuple(sr), mlp_ratios=tuple(mlp),
                      **{"query/key/value biases": "bias" in enc["block1_0"]["attn"]["q"]})
    if not encoder_only:
        fields["AllSpark module"] = "allspark" in params
        if "head" in params:
            fields["decoder_hidden_size"] = int(params["head"]["linear_c1"]["proj"]["kernel"].shape[1])
            fields["num_labels"] = int(params["head"]["linear_pred"]["kernel"].shape[3])
    return fields


def _file_fields(config: Mapping[str, Any], source: str, encoder_only: bool) -> dict[str, Any]:
    """{field: value} as transformers builds the network from `config`."""
    fields = {f: tuple(int(x) for x in config[f]) for f in STAGE_FIELDS}
    fields.update({"num_encoder_blocks": config["num_encoder_blocks"],
                   "num_channels": config["num_channels"], "query/key/value biases": True})
    if not encoder_only:
        fields.update({"decoder_hidden_size": config["decoder_hidden_size"],
                       "num_labels": num_labels(config, source), "AllSpark module": False,
                       "LayerNorm eps of blocks and stages": TRANSFORMERS_NORM_EPS})
    return fields


def check_config(config: Mapping[str, Any], model: ModelConfig | MiTConfig | Mapping,
                 source: str = CONFIG_NAME, *, encoder_only: bool = False) -> None:
    """Checks a transformers config (with defaults filled, as `read_checkpoint` returns it).

    `model` is the model loaded into or exported from: a ModelConfig (every field compared), a
    MiTConfig (encoder only), or Flax variables (the fields their shapes determine). With
    `encoder_only` the decoder, class count and LayerNorm eps are not compared.
    Raises WeightImportError with one line per problem: unsupported semantics, and each mismatch
    as "field: FILE in the file, MODEL in the model".
    """
    errors = _check_semantics(config, source)
    if not errors:
        if isinstance(model, (ModelConfig, MiTConfig)):
            theirs = _model_fields(model, encoder_only)
        else:
            theirs = _variables_fields(model, encoder_only)
        ours = _file_fields(config, source, encoder_only)
        for field, value in theirs.items():
            if ours[field] != value:
                errors.append(f"{field}: {ours[field]} in the file, {value} in the model")
    if errors:
        raise WeightImportError(f"{source} does not fit the model:\n  " + "\n  ".join(errors))


def model_config_for(config: Mapping[str, Any], **overrides) -> ModelConfig:
    """The ModelConfig that computes what transformers computes for `config` (SegFormer, no AllSpark,
    LayerNorm eps 1e-5); `overrides` replace ModelConfig fields (e.g. head_dropout)."""
    config = {**CONFIG_DEFAULTS, **config}
    errors = _check_semantics(config, CONFIG_NAME)
    if errors:
        raise WeightImportError(f"{CONFIG_NAME}: " + "; ".join(errors))
    stages = {f: tuple(int(x) for x in config[f]) for f in STAGE_FIELDS}
    mit = MiTConfig(embed_dims=stages["hidden_sizes"], depths=stages["depths"],
                    num_heads=stages["num_attention_heads"], sr_ratios=stages["sr_ratios"],
                    mlp_ratios=stages["mlp_ratios"], patch_kernels=stages["patch_sizes"],
                    patch_strides=stages["strides"], qkv_bias=True,
                    drop_path_rate=float(config["drop_path_rate"]), norm_eps=TRANSFORMERS_NORM_EPS)
    fields = dict(backbone=mit, num_classes=num_labels(config),
                  decoder_dim=int(config["decoder_hidden_size"]),
                  head_dropout=float(config["classifier_dropout_prob"]), allspark=False,
                  allspark_heads=1, attn_drop=0.0, proj_drop=0.0)  # not read without AllSpark
    return ModelConfig(**{**fields, **overrides})


def to_config(model: ModelConfig | MiTConfig, *, encoder_only: bool = False,
              id2label: Mapping[int | str, str] | None = None) -> dict[str, Any]:
    """config.json for `model` as transformers writes it: `SegformerModel` (encoder_only) or
    `SegformerForSemanticSegmentation`; labels `LABEL_i` unless `id2label` names them."""
    mit = model if isinstance(model, MiTConfig) else model.backbone
    config = {
        **CONFIG_DEFAULTS,
        "architectures": ["SegformerModel" if encoder_only else "SegformerForSemanticSegmentation"],
        "model_type": "segformer", "num_encoder_blocks": len(mit.embed_dims),
        "hidden_sizes": list(mit.embed_dims), "depths": list(mit.depths),
        "num_attention_heads": list(mit.num_heads), "sr_ratios": list(mit.sr_ratios),
        "mlp_ratios": list(mit.mlp_ratios), "patch_sizes": list(mit.patch_kernels),
        "strides": list(mit.patch_strides), "drop_path_rate": mit.drop_path_rate,
    }
    if isinstance(model, ModelConfig):
        config.update(decoder_hidden_size=model.decoder_dim,
                      classifier_dropout_prob=model.head_dropout)
    if not encoder_only:
        if not isinstance(model, ModelConfig):
            raise TypeError("a whole-network config needs a ModelConfig, got a MiTConfig")
        names = ({int(k): str(v) for k, v in id2label.items()} if id2label is not None
                 else {i: f"LABEL_{i}" for i in range(model.num_classes)})
        if sorted(names) != list(range(model.num_classes)):
            raise ValueError(f"id2label must name classes 0..{model.num_classes - 1}, got "
                             f"{sorted(names)}")
        config["id2label"] = {str(i): names[i] for i in range(model.num_classes)}
        config["label2id"] = {names[i]: i for i in range(model.num_classes)}
    return config


# ------------------------------------------------------------------------- files and weights


WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PT_WEIGHTS_NAME = "pytorch_model.bin"
PT_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
_IMAGE_CLASSIFIER = re.compile(r"^classifier\.")


# ----------------------------------------------------------------------------- reading

DINOV2_MODEL_TYPE = "dinov2"


class Checkpoint(NamedTuple):
    """A transformers checkpoint as read from its files."""

    state: dict[str, np.ndarray]  # the transformers layout, keys as in the file, numpy arrays
    # config.json; SegformerConfig's defaults filled in unless it is a Dinov2Model's (`is_dinov2`)
    config: dict[str, Any]
    source: str  # the config.json path (preceded by the hub id for a download), for messages


def is_dinov2(checkpoint: Checkpoint) -> bool:
    """Whether the checkpoint is a transformers `Dinov2Model` (config.json model_type 'dinov2')."""
    return checkpoint.config.get("model_type") == DINOV2_MODEL_TYPE


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
    """Reads a transformers checkpoint (SegFormer or Dinov2Model): a directory, or a `.safetensors`
    file beside its config.json. `hub_id`: the hub repository `path` was downloaded from
    (`download`), for messages.

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
            raise WeightImportError(f"{hub_id}: the hub repository holds no model weights "
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
    if config.get("model_type") != DINOV2_MODEL_TYPE:
        config = {**CONFIG_DEFAULTS, **config}
    return Checkpoint(state, config, source)


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


def import_dinov2_encoder(checkpoint: Checkpoint, variables: Mapping, *,
                          encoder: DINOv2Config | None = None) -> dict:
    """Replaces `variables['params']['backbone']` with the encoder of a transformers `Dinov2Model`
    checkpoint. Its config.json's architecture (`dinov2.config_from_transformers`: width, depth,
    heads, MLP ratio and kind, patch, position grid, channels, qkv bias, LayerNorm eps) is first
    compared with `encoder`, the model's (one line naming each differing field; without it, what
    the variables' shapes show is checked with the keys); then the keys, strictly. The position
    interpolation is the model's own (its config), not transformers'."""
    if not is_dinov2(checkpoint):
        raise WeightImportError(f"{checkpoint.source}: model_type "
                                f"{checkpoint.config.get('model_type')!r}; expected "
                                f"{DINOV2_MODEL_TYPE!r} (transformers' Dinov2Model)")
    # Architectures the encoder does not compute (another activation, non-square sizes) are refused
    # even without a model config.
    theirs = dinov2.config_from_transformers(checkpoint.config, source=checkpoint.source)
    if encoder is not None:
        fields = ("embed_dim", "depth", "num_heads", "mlp_ratio", "ffn", "patch_size", "pos_grid",
                  "in_channels", "qkv_bias", "norm_eps")
        diffs = [f"{f} {getattr(theirs, f)} in the file, {getattr(encoder, f)} in the model"
                 for f in fields if getattr(theirs, f) != getattr(encoder, f)]
        if diffs:
            raise WeightImportError(f"{checkpoint.source}: the DINOv2 encoder does not fit the "
                                    f"model's: " + "; ".join(diffs))
    return dinov2.import_encoder(checkpoint.state, variables, layout="transformers",
                                 source=checkpoint.source)


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


def _write(directory: str, state: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> str:
    """Writes `directory/model.safetensors` and `config.json`; returns the directory."""
    os.makedirs(directory, exist_ok=True)
    # transformers refuses safetensors files without format metadata.
    # np.array, not np.ascontiguousarray: the latter turns 0-d arrays (num_batches_tracked) into 1-d.
    safetensors.numpy.save_file({k: np.array(v, order="C") for k, v in state.items()},
                                os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    return directory


def _shape_map(tree: Mapping) -> dict[str, tuple[int, ...]]:
    return {jax.tree_util.keystr(path): tuple(np.shape(leaf))
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _save_dinov2_encoder(variables: Mapping, encoder: DINOv2Config, directory: str,
                         encoder_only: bool) -> str:
    if not encoder_only:
        raise WeightImportError(f"export to {directory}: transformers has no DINOv2 segmentation "
                                f"model (UniMatch V2's DPT head); export the encoder "
                                f"(encoder_only=True) or the whole model with "
                                f"release_files.save_unimatch_checkpoint")
    params = variables["params"]["backbone"]
    side = encoder.patch_size * 2
    expected = jax.eval_shape(DINOv2(encoder).init, jax.random.key(0),
                              jnp.zeros((1, side, side, encoder.in_channels)))["params"]
    if _shape_map(expected) != _shape_map(params):
        raise WeightImportError(f"export to {directory}: the variables' encoder is not the "
                                f"DINOv2 encoder of model_config ({encoder})")
    state = dinov2.encoder_to_state_dict(params, layout="transformers")
    return _write(directory, state, dinov2.transformers_config(encoder))


def save_checkpoint(variables: Mapping, model_config: ModelConfig | MiTConfig | DINOv2Config,
                    directory: str | os.PathLike, *, encoder_only: bool = False,
                    id2label: Mapping[int | str, str] | None = None) -> str:
    """Writes `directory/model.safetensors` + `config.json` that transformers' `from_pretrained` reads.

    Whole network (a model without AllSpark, norm_eps 1e-5): `SegformerForSemanticSegmentation`,
    keys `segformer.encoder.*` + `decode_head.*`. `encoder_only`: the encoder of any model as a
    `SegformerModel` (keys `encoder.*`), or, for a DINOv2 model (`model_config` a ModelConfig with a
    DINOv2 backbone, or a DINOv2Config), as a `Dinov2Model` (the hub's keys; transformers has no
    whole DINOv2 segmentation model). Returns the directory.
    """
    directory = os.fspath(directory)
    backbone = getattr(model_config, "backbone", model_config)
    if isinstance(backbone, DINOv2Config):
        return _save_dinov2_encoder(variables, backbone, directory, encoder_only)
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
    return _write(directory, state, config)
