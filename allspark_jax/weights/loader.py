"""The weights loader: the one place that decides where a weight spec's weights come from.

A weight spec is a path or id given by the user (`model.pretrained`, `--checkpoint`, or a caller
of this module). `source_of` decides its kind, by these rules in this order:

  kind            spec                                              read by
  'huggingface'   a directory holding config.json and weights       weights.huggingface
                  (model.safetensors, its index, a single
                  *.safetensors, or pytorch_model.bin), or a
                  `.safetensors` file beside its config.json
  'npz'           a `.npz` file: a state dict in the release's      weights.release_files
                  names (numpy.savez)
  'pth'           a `.pth` / `.pt` file (torch.save): the           weights.release_files
                  release's `latest.pth` / `best.pth` (its `model`
                  entry), a plain or mmseg-style state dict, or a
                  SegFormer `mit_bX.pth` encoder
  'hub'           'org/name' that is no local path and does not     weights.huggingface
                  end like a file: a Hugging Face hub id, fetched     (download)
                  with huggingface_hub

A file named with a known suffix that does not exist is a FileNotFoundError naming it; any other
spec is a WeightImportError naming it and what is accepted. The `load_*` functions dispatch on the
kind and return what callers need: Flax variables (whole model or encoder), or a model with its
variables when the source fixes its own architecture (a Hugging Face
`SegformerForSemanticSegmentation`: its config.json).

New layouts (the DINOv2 encoders and the UniMatch V2 checkpoints, as they come) are added here and
only here: a kind in `KINDS`, its rule in `source_of`, and its branch in the `load_*` functions that
take it, calling a module of this package for that layout's names and files.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Mapping

import jax
import numpy as np

from allspark_jax.errors import WeightImportError
from allspark_jax.models.mit import MiTConfig
from allspark_jax.models.segmentor import AllSparkSegmentor, ModelConfig, init_variables
from allspark_jax.weights import dinov2, huggingface, release, release_files
from allspark_jax.weights.huggingface_keys import to_release_state_dict

HUGGINGFACE, NPZ, PTH, HUB = "huggingface", "npz", "pth", "hub"
# Every kind of weight source, and what a spec of that kind is (for messages). The DINOv2 and
# UniMatch V2 layouts join this table when they are implemented (see the module docstring).
KINDS = {
    PTH: "a .pth / .pt file (torch.save: the release's latest.pth / best.pth, a state dict, a "
         "SegFormer mit_bX.pth encoder)",
    NPZ: "an .npz state dict in the release's names (numpy.savez)",
    HUGGINGFACE: "a Hugging Face SegFormer checkpoint (a directory holding config.json and "
                 "model.safetensors, or a .safetensors file beside its config.json)",
    HUB: "a Hugging Face hub id 'org/name'",
}
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


def _release_state_dict(source: WeightSource) -> dict[str, np.ndarray]:
    """The state dict of a release file (kind 'npz' or 'pth'), as stored."""
    if source.kind == NPZ:
        return release_files.read_npz(source.spec)
    return release_files.read_pth(source.spec)


def read_state_dict(spec: str | os.PathLike | WeightSource) -> dict[str, np.ndarray]:
    """The state dict of any weight source in the release's names (`weights.release`), unchecked:
    a release file's as stored (an official checkpoint's `model` entry), a Hugging Face
    checkpoint's renamed (its config.json is not read; `load_variables` checks it)."""
    source = source_of(spec)
    if source.is_huggingface:
        checkpoint = _huggingface_checkpoint(source)
        return to_release_state_dict(checkpoint.state, source=checkpoint.source)
    return _release_state_dict(source)


# ----------------------------------------------------------------------------------- loading

def load_variables(spec: str | os.PathLike | WeightSource, template: Mapping, *,
                   model_config: ModelConfig | None = None) -> dict:
    """Whole-model weights -> Flax variables shaped like `template` (arrays or ShapeDtypeStructs).

    Strict: every missing, unexpected or mis-shaped key is a WeightImportError naming the file.
    `model_config` is used by Hugging Face checkpoints only: their config.json is compared with it
    field by field (without it, with what the template's shapes show).
    """
    source = source_of(spec)
    if source.is_huggingface:
        return huggingface.import_variables(_huggingface_checkpoint(source), template,
                                            model_config=model_config)
    return release.from_state_dict(_release_state_dict(source), template, source=source.spec)


def load_pretrained_encoder(spec: str | os.PathLike | WeightSource, variables: Mapping, *,
                            model_config: ModelConfig | MiTConfig | None = None) -> dict:
    """`variables` with `params/backbone` replaced by the encoder of `spec`: a SegFormer
    `mit_bX.pth` (or `.npz`) state dict, or a Hugging Face `SegformerModel` /
    `SegformerForImageClassification` checkpoint (`model_config`, a ModelConfig or MiTConfig, as in
    `load_variables`). Their ImageNet classifiers are ignored. For a DINOv2 encoder (`variables`
    of encoder 'dinov2'): facebookresearch's `dinov2_vit*14_pretrain.pth` state dict (`.pth` or
    `.npz`, as `release_files.save_pretrained_encoder` writes it)."""
    source = source_of(spec)
    if release_files.is_dinov2_encoder(variables):
        if source.is_huggingface:
            raise WeightImportError(f"{source.spec}: a DINOv2 encoder's model.pretrained must be "
                                    f"a facebookresearch dinov2_vit*14_pretrain.pth state dict "
                                    f"(.pth or .npz)")
        loaded = dinov2.encoder_from_state_dict(_release_state_dict(source),
                                                variables["params"]["backbone"],
                                                layout="dinov2", source=source.spec)
        return release.with_encoder(variables, loaded)
    if source.is_huggingface:
        return huggingface.import_encoder(_huggingface_checkpoint(source), variables,
                                          model_config=model_config)
    return release.import_encoder(_release_state_dict(source), variables, source=source.spec)


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


def load_network(spec: str | os.PathLike | WeightSource, model: AllSparkSegmentor,
                 crop_size: int) -> Network:
    """Whole-network weights for inference.

    A source that fixes its own architecture (a Hugging Face `SegformerForSemanticSegmentation`:
    its config.json builds SegFormer without AllSpark, as transformers computes it) comes with its
    own model, and `model` is not used; a release file is read into `model`, whose variables for
    training crops of `crop_size` (the Semantic Memory's shape) are the template.
    """
    source = source_of(spec)
    if source.is_huggingface:
        built, variables, config = load_segformer(source)
        return Network(built, variables,
                       tuple(str(v) for v in config.get("id2label", {}).values()))
    template = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), int(crop_size)))
    return Network(model, load_variables(source, template), None)
