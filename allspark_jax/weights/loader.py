"""The weights loader: the one place that decides where a weight spec's weights come from.

A weight spec is a path or id given by the user (`model.pretrained`, `--checkpoint`, or a caller
of this module). `source_of` decides its kind, by these rules in this order:

  kind            spec                                              read by
  'huggingface'   a directory holding config.json and weights       weights.huggingface
                  (model.safetensors, its index, a single
                  *.safetensors, or pytorch_model.bin), or a
                  `.safetensors` file beside its config.json
  'npz'           a `.npz` file: a state dict (numpy.savez)          weights.release_files
  'pth'           a `.pth` / `.pt` file (torch.save): a state       weights.release_files
                  dict, or a training checkpoint's `model` entry
                  (and UniMatch V2's `model_ema`), or an mmseg
                  `state_dict` entry
  'hub'           'org/name' that is no local path and does not     weights.huggingface
                  end like a file: a Hugging Face hub id, fetched     (download)
                  with huggingface_hub

A file named with a known suffix that does not exist is a FileNotFoundError naming it; any other
spec is a WeightImportError naming it and what is accepted.

What the weights are is then decided from their contents, never from the file's name, and must be
the family of the model they go into (`ModelConfig.encoder`; a mismatch is a WeightImportError
naming the file, what it holds and what the model needs):

  holds (from)                                    family  load_variables /     load_pretrained_
                                                          --checkpoint         encoder /
                                                                               model.pretrained
  release state dict (.pth/.npz keys backbone.*,  mit     the whole model      -
    decoder.*: AllSpark's latest.pth / best.pth,
    the baselines')
  mit_bX.pth encoder (patch_embed1.*, block1.*)   mit     -                    the encoder
  transformers SegFormer (config.json model_type  mit     SegformerFor-        SegformerModel,
    'segformer')                                          SemanticSegmentation SegformerFor-
                                                                               ImageClassification
  UniMatch V2 DPT state dict (.pth/.npz keys      dinov2  the whole model      -
    backbone.cls_token, backbone.blocks.*,                (method semi /
    head.*; plain, `module.`-prefixed, or its                supervised)
    trainer's `model` [+ `model_ema`])
  facebookresearch DINOv2 encoder (cls_token,     dinov2  -                    the encoder
    patch_embed.proj.*, blocks.*:
    dinov2_vit{s,b,l,g}14_pretrain.pth)
  transformers Dinov2Model (config.json           dinov2  -                    the encoder
    model_type 'dinov2'; facebook/dinov2-*)

(`weights.dinov2.layout_of` recognises the DINOv2 state dicts; everything else is read as the
release's names, strictly.) The `load_*` functions dispatch on kind and contents and return what
callers need: Flax variables (whole model or encoder), or a model with its variables when the
source fixes its own architecture (a Hugging Face `SegformerForSemanticSegmentation`: its
config.json).

New layouts are added here and only here: a kind in `KINDS`
and its rule in `source_of` if it comes in a new container, its row above, and its branch in the
`load_*` functions that take it, calling a module of this package for that layout's names and
files (a whole DINOv2-family state dict: `weights.dinov2.variables_from_state_dict`).
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Mapping

import jax
import numpy as np

from allspark_jax.errors import WeightImportError
from allspark_jax.models.dinov2 import DINOv2Config
from allspark_jax.models.mit import MiTConfig
from allspark_jax.models.segmentor import AllSparkSegmentor, ModelConfig, init_variables
from allspark_jax.weights import dinov2, huggingface, release, release_files
from allspark_jax.weights.huggingface_keys import to_release_state_dict

HUGGINGFACE, NPZ, PTH, HUB = "huggingface", "npz", "pth", "hub"
# Every kind of weight source, and what a spec of that kind is (for messages).
KINDS = {
    PTH: "a .pth / .pt file (torch.save: the release's latest.pth / best.pth, a state dict, a "
         "SegFormer mit_bX.pth encoder, UniMatch V2's DPT checkpoint, a DINOv2 "
         "dinov2_vit*14_pretrain.pth encoder)",
    NPZ: "an .npz state dict (numpy.savez) in one of those layouts",
    HUGGINGFACE: "a Hugging Face SegFormer or Dinov2Model checkpoint (a directory holding "
                 "config.json and model.safetensors, or a .safetensors file beside its "
                 "config.json)",
    HUB: "a Hugging Face hub id 'org/name'",
}
MIT, DINOV2 = "mit", "dinov2"  # the encoder families (`ModelConfig.encoder`)
UNKNOWN = "unknown"
# What a file holds (`_holds`, or a Hugging Face checkpoint's model_type), for messages.
_HOLDS = {
    dinov2.UNIMATCH_V2: "UniMatch V2's DPT model (a DINOv2 model)",
    "dinov2": "a DINOv2 encoder (facebookresearch's dinov2_vit*14_pretrain.pth keys)",
    "transformers": "a DINOv2 encoder (transformers' Dinov2Model keys)",
    "hf_dinov2": "a transformers Dinov2Model (a DINOv2 encoder)",
    "hf_segformer": "a transformers SegFormer checkpoint (a MiT model)",
    MIT: "a MiT model or encoder (the release's or SegFormer's names)",
    UNKNOWN: "neither DINOv2 nor MiT keys",
}
# What `load_pretrained_encoder` takes for each family, for messages.
_ENCODERS = {
    MIT: "a SegFormer mit_bX.pth or a Hugging Face SegformerModel checkpoint",
    DINOV2: "a DINOv2 dinov2_vit*14_pretrain.pth or a Hugging Face Dinov2Model checkpoint",
}
# Keys that mark a MiT encoder's state dict (mit_bX.pth) or a whole MiT model's (the release's).
_MIT_KEYS = ("patch_embed1.proj.weight", "backbone.patch_embed1.proj.weight")
SUFFIXES = {".safetensors": HUGGINGFACE, ".npz": NPZ, ".pth": PTH, ".pt": PTH}
# Every weight source in one phrase, for messages (also of callers that take other specs too).
SOURCES = "; ".join(list(KINDS.values())[:-1]) + "; or " + list(KINDS.values())[-1]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
# Names ending so are files, never hub ids.
_FILE_SUFFIXES = (".pth", ".pt", ".npz", ".bin", ".safetensors", ".ckpt", ".pkl", ".json", ".h5")


@dataclasses.dataclass(frozen=True)
class WeightSource:
    """A weight spec and its kind (one of `KINDS`), as `source_of` decided. Path-like: the spec."""

    kind: str
    spec: str

    @property
    def name(self) -> str:
        """What names the weights in results: the absolute path of a release file, else the spec."""
        return os.path.abspath(self.spec) if self.kind in (NPZ, PTH) else self.spec

    @property
    def is_huggingface(self) -> bool:
        return self.kind in (HUGGINGFACE, HUB)

    def __fspath__(self) -> str:
        return self.spec

    def __str__(self) -> str:
        return self.spec


def _unknown(spec: str, why: str) -> WeightImportError:
    return WeightImportError(f"{spec}: not a weight source ({why}); expected {SOURCES}")


def source_of(spec: str | os.PathLike | WeightSource) -> WeightSource:
    """The kind of weight source `spec` names (the rules of the module docstring).

    Raises FileNotFoundError for a file with a weight suffix that does not exist, and
    WeightImportError naming `spec` for anything that is no weight source.
    """
    if isinstance(spec, WeightSource):
        return spec
    s = os.fspath(spec)
    if os.path.isdir(s):
        if os.path.isfile(os.path.join(s, huggingface.CONFIG_NAME)) and huggingface.weight_files(s):
            return WeightSource(HUGGINGFACE, s)
        raise _unknown(s, f"a directory without {huggingface.CONFIG_NAME} and model weights")
    kind = next((k for suffix, k in SUFFIXES.items() if s.endswith(suffix)), None)
    if kind is not None:
        if not os.path.isfile(s):
            raise FileNotFoundError(2, "No such weight file", s)
        return WeightSource(kind, s)
    if not os.path.exists(s) and _HUB_ID.match(s) and not s.lower().endswith(_FILE_SUFFIXES):
        return WeightSource(HUB, s)
    if os.path.exists(s):
        raise _unknown(s, f"a file whose name ends in none of {', '.join(SUFFIXES)}")
    raise _unknown(s, "no such file or directory, and not a hub id 'org/name'")


# ----------------------------------------------------------------------------------- reading

def _huggingface_checkpoint(source: WeightSource) -> huggingface.Checkpoint:
    if source.kind == HUB:
        return huggingface.read_checkpoint(huggingface.download(source.spec), hub_id=source.spec)
    return huggingface.read_checkpoint(source.spec)


def _release_checkpoint(source: WeightSource
                        ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """(state dict, EMA state dict or None) of a file of kind 'npz' or 'pth', as stored."""
    if source.kind == NPZ:
        return release_files.read_npz(source.spec), None
    return release_files.read_pth_checkpoint(source.spec)


def read_state_dict(spec: str | os.PathLike | WeightSource) -> dict[str, np.ndarray]:
    """The state dict of any weight source, unchecked: a file's as stored (a training checkpoint's
    `model` entry), a Hugging Face SegFormer checkpoint's renamed to the release's names
    (`weights.release`; its config.json is not read: `load_variables` checks it), a Dinov2Model's
    as stored (transformers' names)."""
    source = source_of(spec)
    if source.is_huggingface:
        checkpoint = _huggingface_checkpoint(source)
        if huggingface.is_dinov2(checkpoint):
            return checkpoint.state
        return to_release_state_dict(checkpoint.state, source=checkpoint.source)
    return _release_checkpoint(source)[0]


# ----------------------------------------------------------------------------------- loading

def _family(model_config, variables: Mapping) -> str:
    """The model's encoder family: from `model_config` (a ModelConfig, MiTConfig or DINOv2Config)
    when given, else from the variables' encoder parameters."""
    if model_config is not None:
        backbone = getattr(model_config, "backbone", model_config)
        return DINOV2 if isinstance(backbone, DINOv2Config) else MIT
    return DINOV2 if dinov2.holds_dinov2(variables) else MIT


def _holds(state: Mapping) -> str:
    """What a state dict is (a key of `_HOLDS`), by its keys (a `module.` prefix dropped)."""
    layout = dinov2.layout_of(state)
    if layout is not None:
        return layout
    keys = release.strip_prefix(state, "module.")
    return MIT if any(k in keys for k in _MIT_KEYS) else UNKNOWN


def _wrong_family(source: str, holds: str, family: str, need: str) -> WeightImportError:
    return WeightImportError(f"{source}: holds {_HOLDS[holds]}; the model's encoder is "
                             f"{'DINOv2' if family == DINOV2 else 'MiT'} "
                             f"(config.model.encoder={family!r}): expected {need}")


def _whole_model_error(source: str, holds: str, family: str) -> WeightImportError:
    if holds in ("dinov2", "transformers", "hf_dinov2") and family == DINOV2:
        return WeightImportError(f"{source}: holds {_HOLDS[holds]}, not a whole model; give it "
                                 f"as config.model.pretrained (the encoder to start from)")
    return _wrong_family(source, holds, family,
                         "UniMatch V2's DPT model (backbone.* + head.*)" if family == DINOV2 else
                         "the release's state dict or a SegFormer checkpoint")


def _dinov2_configs(model_config) -> dict:
    """{'encoder', 'head'} of a DINOv2 ModelConfig (None otherwise), for the architecture checks."""
    if isinstance(model_config, ModelConfig):
        return {"encoder": model_config.backbone, "head": model_config.dpt}
    return {"encoder": None, "head": None}


def _state_to_variables(state: Mapping, template: Mapping, source: str, family: str,
                        model_config) -> dict:
    """A file's whole-model state dict -> variables of the model of `family`."""
    holds = _holds(state)
    if family == DINOV2:
        if holds != dinov2.UNIMATCH_V2:
            raise _whole_model_error(source, holds, family)
        return dinov2.variables_from_state_dict(state, template, source=source,
                                                **_dinov2_configs(model_config))
    if holds not in (MIT, UNKNOWN):  # unknown keys: the strict import lists them
        raise _whole_model_error(source, holds, family)
    return release.from_state_dict(state, template, source=source)


def _load_whole(source: WeightSource, template: Mapping, model_config
                ) -> tuple[dict, dict | None]:
    """(variables, EMA variables or None) of a whole-model source, strictly (`load_variables`)."""
    family = _family(model_config, template)
    if source.is_huggingface:
        checkpoint = _huggingface_checkpoint(source)
        if huggingface.is_dinov2(checkpoint):
            raise _whole_model_error(checkpoint.source, "hf_dinov2", family)
        if family == DINOV2:
            raise _wrong_family(checkpoint.source, "hf_segformer", family,
                                "UniMatch V2's DPT model (backbone.* + head.*)")
        return huggingface.import_variables(checkpoint, template, model_config=model_config), None
    state, ema = _release_checkpoint(source)
    variables = _state_to_variables(state, template, source.spec, family, model_config)
    if ema is not None:
        ema = _state_to_variables(ema, template, f"{source.spec} ({release_files.EMA_ENTRY})",
                                  family, model_config)
    return variables, ema


def load_variables(spec: str | os.PathLike | WeightSource, template: Mapping, *,
                   model_config: ModelConfig | None = None) -> dict:
    """Whole-model weights -> Flax variables shaped like `template` (arrays or ShapeDtypeStructs).

    Strict: every missing, unexpected or mis-shaped key is a WeightImportError naming the file, as
    is a file of the other encoder family (the table of the module docstring). `model_config`, when
    given, fixes the family (else the template's encoder shows it) and is compared with what the
    file shows: a Hugging Face config.json field by field (without it, with what the template's
    shapes show), a UniMatch V2 state dict's shapes (`weights.dinov2.check_architecture`). A
    training checkpoint gives its `model` entry (`load_network` also reads UniMatch V2's
    `model_ema`).
    """
    return _load_whole(source_of(spec), template, model_config)[0]


def load_pretrained_encoder(spec: str | os.PathLike | WeightSource, variables: Mapping, *,
                            model_config: ModelConfig | MiTConfig | DINOv2Config | None = None
                            ) -> dict:
    """`variables` with `params/backbone` replaced by the encoder of `spec`, of the model's family
    (`model_config`, a ModelConfig, MiTConfig or DINOv2Config, else what `variables` show):

      MiT     a SegFormer `mit_bX.pth` (or `.npz`) state dict, or a Hugging Face `SegformerModel` /
              `SegformerForImageClassification` checkpoint (their ImageNet classifiers are
              ignored; config.json compared as in `load_variables`);
      DINOv2  facebookresearch's `dinov2_vit{s,b,l,g}14_pretrain.pth` (or `.npz` in its names), or
              a Hugging Face `Dinov2Model` checkpoint (directory, .safetensors or hub id such as
              facebook/dinov2-small); with `model_config` its architecture is compared with the
              model's first (one line naming each differing field).

    Everything else in `variables` (head, AllSpark, memory) is kept. Strict: a file of the other
    family, or a whole model, is a WeightImportError naming the file and what it holds.
    """
    source = source_of(spec)
    family = _family(model_config, variables)
    backbone = getattr(model_config, "backbone", model_config)
    if source.is_huggingface:
        checkpoint = _huggingface_checkpoint(source)
        if huggingface.is_dinov2(checkpoint) != (family == DINOV2):
            holds = "hf_dinov2" if huggingface.is_dinov2(checkpoint) else "hf_segformer"
            raise _wrong_family(checkpoint.source, holds, family, _ENCODERS[family])
        if family == DINOV2:
            return huggingface.import_dinov2_encoder(checkpoint, variables, encoder=backbone)
        return huggingface.import_encoder(checkpoint, variables, model_config=model_config)
    state = _release_checkpoint(source)[0]
    holds = _holds(state)
    if family == DINOV2:
        if holds in dinov2.LAYOUTS:  # an encoder in facebookresearch's or transformers' names
            return dinov2.import_encoder(state, variables, layout=holds, source=source.spec,
                                         encoder=backbone)
        if holds == dinov2.UNIMATCH_V2:
            raise WeightImportError(f"{source.spec}: holds {_HOLDS[holds]}, not an encoder; "
                                    f"expected {_ENCODERS[family]} (a whole model is a "
                                    f"--checkpoint)")
        raise _wrong_family(source.spec, holds, family, _ENCODERS[family])
    if holds not in (MIT, UNKNOWN):  # unknown keys: the strict import lists them
        raise _wrong_family(source.spec, holds, family, _ENCODERS[family])
    return release.import_encoder(state, variables, source=source.spec)



def _require_huggingface(source: WeightSource) -> None:
    if not source.is_huggingface:
        raise WeightImportError(f"{source.spec}: {KINDS[source.kind]}, not a Hugging Face "
                                f"SegFormer checkpoint; expected {KINDS[HUGGINGFACE]} or "
                                f"{KINDS[HUB]}")


def load_segformer(spec: str | os.PathLike | WeightSource, **overrides
                   ) -> tuple[AllSparkSegmentor, dict, dict]:
    """A Hugging Face SegFormer checkpoint (directory, .safetensors or hub id) -> (model, variables,
    config.json dict with SegformerConfig's defaults filled in).

    The model reproduces transformers' (`huggingface.model_config_for`; `overrides` replace
    ModelConfig fields); `model.apply(variables, x, mode="eval")` maps (B, H, W, 3) normalised
    images to (B, H, W, num_labels) logits.
    """
    source = source_of(spec)
    _require_huggingface(source)
    checkpoint = _huggingface_checkpoint(source)
    model, variables = huggingface.segformer(checkpoint, **overrides)
    return model, variables, checkpoint.config


@dataclasses.dataclass(frozen=True)
class Network:
    """A model and its variables, loaded for inference by `load_network`."""

    model: AllSparkSegmentor
    variables: dict
    # The class names the source carries (a Hugging Face config.json's id2label); None when the
    # source has none and the model is the caller's.
    labels: tuple[str, ...] | None
    # The EMA model's variables when the source holds one (UniMatch V2's trainer checkpoints:
    # `model_ema`); None otherwise.
    ema: dict | None = None


def load_network(spec: str | os.PathLike | WeightSource, model: AllSparkSegmentor,
                 crop_size: int) -> Network:
    """Whole-network weights for inference.

    A source that fixes its own architecture (a Hugging Face `SegformerForSemanticSegmentation`:
    its config.json builds SegFormer without AllSpark, as transformers computes it) comes with its
    own model, and `model` is not used; a file is read into `model` (`load_variables`, with
    `model.config`), whose variables for training crops of `crop_size` (the Semantic Memory's
    shape) are the template; a UniMatch V2 trainer checkpoint's `model_ema` comes as `ema`.
    """
    source = source_of(spec)
    if source.is_huggingface and model.config.encoder == MIT:
        checkpoint = _huggingface_checkpoint(source)
        if huggingface.is_dinov2(checkpoint):
            raise _whole_model_error(checkpoint.source, "hf_dinov2", MIT)
        built, variables = huggingface.segformer(checkpoint)
        return Network(built, variables,
                       tuple(str(v) for v in checkpoint.config.get("id2label", {}).values()))
    template = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), int(crop_size)))
    variables, ema = _load_whole(source, template, model.config)
    return Network(model, variables, None, ema)
