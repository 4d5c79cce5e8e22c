"""SegFormer checkpoints in the Hugging Face `transformers` layout (config.json + safetensors).

Accepted sources (`read_checkpoint`): a directory holding ``config.json`` and ``model.safetensors``
(or a sharded ``model.safetensors.index.json``, or, when it has no safetensors, ``pytorch_model.bin``
read by `allspark_jax.pth`); a ``.safetensors`` file with ``config.json`` beside it; or a hub id
(``nvidia/mit-b5``, ``nvidia/segformer-b2-finetuned-ade-512-512``) fetched with
`huggingface_hub.snapshot_download` when that package is installed. No torch is needed.

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
  E.layer_norm_1, E.layer_norm_2                B.norm1, B.norm2               LN eps: see below
  E.attention.self.query                        B.attn.q                       (C, C)
  E.attention.self.key, E.attention.self.value  B.attn.kv                      (2C, C) = [key; value]
  E.attention.self.sr                           B.attn.sr                      conv r x r, stride r
  E.attention.self.layer_norm                   B.attn.norm                    LN eps 1e-5 in both
  E.attention.output.dense                      B.attn.proj
  E.mlp.dense1, E.mlp.dwconv.dwconv, E.mlp.dense2   B.mlp.fc1, B.mlp.dwconv.dwconv, B.mlp.fc2
  encoder.layer_norm.{s}                        backbone.norm{S}               LN eps: see below
  decode_head.linear_c.{s}.proj                 decoder.decoder.linear_c{S}.proj   (D, C_S)
  decode_head.linear_fuse (1x1 conv, no bias)   decoder.decoder.linear_fuse.conv   (D, 4D, 1, 1)
  decode_head.batch_norm (weight, bias, running_mean, running_var, num_batches_tracked int64)
                                                decoder.decoder.linear_fuse.bn     BN eps 1e-5
  decode_head.classifier (1x1 conv)             decoder.decoder.linear_pred        (K, D, 1, 1)
  classifier (Linear, ImageNet classes)         backbone.head (the release MiT's classifier)

The release's fused ``kv`` Linear splits its output axis as (2, heads, head_dim), keys first;
transformers' ``key`` and ``value`` split theirs as (heads, head_dim) each, so ``kv`` is key's rows
followed by value's rows (weights and biases). The decode head upsamples stages 2-4 to the stage-1
grid (bilinear, align_corners=False) and concatenates ``[c4, c3, c2, c1]`` in both (transformers:
``torch.cat(all_hidden_states[::-1])``), so ``linear_fuse``'s input-channel blocks map unchanged.

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
    eps); pass a `ModelConfig` to compare all. Then the keys: every missing, unexpected or mis-shaped key is listed, in the file's
    names. Absent config fields take `SegformerConfig`'s defaults, as in transformers.
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from allspark_jax import convert, pth
from allspark_jax.errors import WeightImportError
from allspark_jax.models.mit import MiTConfig
from allspark_jax.models.segmentor import AllSparkSegmentor, ModelConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PT_WEIGHTS_NAME = "pytorch_model.bin"
PT_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
ENCODER_PREFIX = "segformer."  # base_model_prefix of the ...ForImageClassification/Segmentation
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
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_FILE_SUFFIXES = (".pth", ".pt", ".npz", ".bin", ".safetensors", ".ckpt", ".pkl", ".json", ".h5")
_IMAGE_CLASSIFIER = re.compile(r"^classifier\.")

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


# ----------------------------------------------------------------------------- names and layouts

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


def _strip_encoder_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    return {k.removeprefix(ENCODER_PREFIX): v for k, v in state.items()}


def to_release_state_dict(hf_state: Mapping[str, np.ndarray], *,
                          source: str = "state dict") -> dict[str, np.ndarray]:
    """transformers state dict -> the release's names (`allspark_jax.convert`), arrays unchanged.

    Keys may carry the `segformer.` prefix. key/value pairs are fused into `attn.kv` (key rows
    first). Raises WeightImportError naming every key without a release counterpart and every
    key/value pair that is incomplete or whose halves differ in shape.
    """
    state = _strip_encoder_prefix(hf_state)
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


# ----------------------------------------------------------------------------- reading

def is_hub_id(path_or_id: str | os.PathLike) -> bool:
    """'org/name' that is not a local path and does not end like a weights file."""
    s = os.fspath(path_or_id)
    return (not os.path.exists(s) and bool(_HUB_ID.match(s))
            and not s.lower().endswith(_FILE_SUFFIXES))


def _weight_files(directory: str) -> list[str]:
    """The weight files of a checkpoint directory, safetensors preferred; [] if none."""
    for single, index in ((WEIGHTS_NAME, WEIGHTS_INDEX_NAME), (PT_WEIGHTS_NAME, PT_WEIGHTS_INDEX_NAME)):
        if os.path.isfile(os.path.join(directory, single)):
            return [os.path.join(directory, single)]
        if os.path.isfile(os.path.join(directory, index)):
            with open(os.path.join(directory, index)) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(directory, s) for s in shards]
    others = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    return others if len(others) == 1 else []


def is_checkpoint(path_or_id: str | os.PathLike) -> bool:
    """True for what `read_checkpoint` takes: a directory with config.json and weights, a
    `.safetensors` file, or a hub id ('org/name', not a local path)."""
    p = os.fspath(path_or_id)
    if os.path.isdir(p):
        return os.path.isfile(os.path.join(p, CONFIG_NAME)) and bool(_weight_files(p))
    if os.path.isfile(p):
        return p.endswith(".safetensors")
    return is_hub_id(p)


def _download(repo_id: str) -> str:
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
        if not _weight_files(directory):  # older repositories carry only pytorch_model.bin
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
    obj = pth.load_pth(path)
    if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise WeightImportError(f"{path}: expected a state dict (name -> tensor)")
    return obj


def read_checkpoint(path_or_id: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict, str]:
    """Reads a transformers SegFormer checkpoint.

    Returns (state dict in the transformers layout, keys as in the file, float32 / int64 numpy;
    config.json as a dict with SegformerConfig's defaults filled in; source: the config.json path,
    preceded by the hub id for a download, for messages). Raises WeightImportError (or FileNotFoundError) naming the path or hub id.
    """
    p = os.fspath(path_or_id)
    from_hub = False
    if os.path.isfile(p):
        if not p.endswith(".safetensors"):
            raise WeightImportError(f"{p}: expected a .safetensors file or a checkpoint directory")
        directory, files = os.path.dirname(os.path.abspath(p)), [p]
    elif os.path.isdir(p):
        directory, files = p, _weight_files(p)
        if not files:
            raise WeightImportError(
                f"{p}: no weights found (expected {WEIGHTS_NAME}, {WEIGHTS_INDEX_NAME}, a single "
                f"*.safetensors, {PT_WEIGHTS_NAME} or {PT_WEIGHTS_INDEX_NAME})")
    elif is_hub_id(p):
        directory, from_hub = _download(p), True
        files = _weight_files(directory)
        if not files:
            raise WeightImportError(f"{p}: the hub repository holds no SegFormer weights "
                                    f"({WEIGHTS_NAME} or {PT_WEIGHTS_NAME})")
    else:
        raise FileNotFoundError(2, "No such checkpoint file or directory", p)
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise WeightImportError(f"{p}: no {CONFIG_NAME} beside the weights (a transformers "
                                f"checkpoint needs it to fix the architecture)")
    with open(config_path) as f:
        config = json.load(f)
    if not isinstance(config, dict):
        raise WeightImportError(f"{config_path}: expected a JSON object")
    state: dict[str, np.ndarray] = {}
    for path in files:
        part = _read_weights(path)
        if dup := sorted(set(part) & set(state)):
            raise WeightImportError(f"{path}: keys repeated across shards: {', '.join(dup)}")
        state.update(part)
    source = f"{p} ({config_path})" if from_hub else config_path
    return state, {**CONFIG_DEFAULTS, **config}, source


# ----------------------------------------------------------------------------- configuration

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
    expected = from_release_state_dict(convert.to_state_dict(_shapes_only(template)),
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
                 *convert.key_mismatch_lines(missing, unexpected, wrong)]
        if not encoder_only and not any(k.startswith("decode_head.") for k in given):
            lines.append(f"  (no decode_head: {config.get('architectures')} is an encoder "
                         f"checkpoint; load it with convert.load_pretrained_encoder)")
        raise WeightImportError("\n".join(lines))
    release = to_release_state_dict(given, source=source)
    return convert.from_state_dict(release, template, source=source)


def load_variables(path_or_id: str | os.PathLike, template: Mapping, *,
                   model_config: ModelConfig | None = None) -> dict:
    """A `SegformerForSemanticSegmentation` checkpoint -> Flax variables shaped like `template`.

    `template`: variables (arrays or ShapeDtypeStructs) of a model without AllSpark (`params`,
    `batch_stats`). Pass `model_config` to check the fields shapes cannot show (heads, strides,
    LayerNorm eps).
    """
    state, config, source = read_checkpoint(path_or_id)
    return _import(state, config, source, template, model_config, encoder_only=False)


def load_encoder(path_or_id: str | os.PathLike, variables: Mapping, *,
                 model_config: ModelConfig | MiTConfig | None = None) -> dict:
    """Replaces `variables['params']['backbone']` with the MiT encoder of a `SegformerModel` or
    `SegformerForImageClassification` checkpoint (its ImageNet `classifier` is ignored)."""
    state, config, source = read_checkpoint(path_or_id)
    template = {"params": {"backbone": variables["params"]["backbone"]}}
    loaded = _import(state, config, source, template, model_config, encoder_only=True)
    variables = flax.core.unfreeze(variables)
    variables["params"] = {**variables["params"], "backbone": loaded["params"]["backbone"]}
    return variables


def load_segformer(path_or_id: str | os.PathLike, **overrides
                   ) -> tuple[AllSparkSegmentor, dict, dict]:
    """A hub / local SegFormer checkpoint -> (model, variables, config.json dict).

    The model reproduces transformers' (`model_config_for`); `model.apply(variables, x, mode="eval")`
    maps (B, H, W, 3) normalised images to (B, H, W, num_labels) logits.
    """
    state, config, source = read_checkpoint(path_or_id)
    model_config = model_config_for(config, **overrides)
    model = AllSparkSegmentor(model_config)
    # Without AllSpark nothing depends on the input size: any small input fixes the shapes.
    template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                                                 mode="eval"))
    variables = _import(state, config, source, template, model_config, encoder_only=False)
    return model, variables, config


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
    state = from_release_state_dict(convert.to_state_dict(tree), source=source)
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
