"""The release's weight files, read and written without torch: state dicts in `.npz` (numpy.savez)
or `.pth` / `.pt` (torch.save) files, official training checkpoints (`latest.pth` / `best.pth`)
and SegFormer ImageNet encoders (`mit_bX.pth`; a DINOv2 encoder as facebookresearch's
`dinov2_vit*14_pretrain.pth`). Names and layouts: `allspark_jax.weights.release` (`weights.dinov2`).

Which reader a weight spec takes is decided by `allspark_jax.weights.loader`, nowhere else.
"""
from __future__ import annotations

import os
import zipfile
from typing import Mapping

import numpy as np

from allspark_jax.errors import WeightImportError
from allspark_jax.weights import dinov2, release
from allspark_jax.weights.pth_reader import load_pth
from allspark_jax.weights.pth_writer import save_pth


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A state dict written by numpy.savez (name -> numeric array).

    Raises FileNotFoundError if there is no such file, WeightImportError naming the file if it is
    not a zip archive of numeric arrays.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not zipfile.is_zipfile(path):
        raise WeightImportError(f"{path}: not an .npz (zip) archive; expected a state dict "
                                "written by numpy.savez (name -> array)")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise WeightImportError(f"{path}: not a readable .npz state dict of numeric arrays "
                                f"({e})") from e


def read_pth(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The state dict of a torch.save file: a plain state dict, an official training checkpoint's
    `model` entry, or an mmseg-style checkpoint's `state_dict` entry.

    Raises FileNotFoundError if there is no such file, WeightImportError (a PthFormatError for the
    container) naming the file otherwise.
    """
    path = os.fspath(path)
    obj = load_pth(path)  # a PthFormatError is a WeightImportError naming the file
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]  # official latest.pth / best.pth
    elif isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # mmseg-style checkpoints
    if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise WeightImportError(f"{path}: expected a state dict (name -> tensor), an official "
                                f"checkpoint with a 'model' entry, or a dict with 'state_dict'")
    return obj


def is_dinov2_encoder(variables: Mapping) -> bool:
    """Whether `variables`' encoder (`params/backbone`) is a DINOv2 (its position embeddings and
    class token; MiT has neither)."""
    backbone = variables.get("params", {}).get("backbone", {})
    return "pos_embed" in backbone and "cls_token" in backbone


def save_pretrained_encoder(variables: Mapping, path: str | os.PathLike) -> None:
    """Writes the encoder of `variables` as a SegFormer `mit_bX.pth` state dict (encoder keys
    without prefix), a DINOv2 encoder as facebookresearch's `dinov2_vit*14_pretrain.pth` one:
    `.npz` when `path` ends so, else torch.save's format. The loader's `load_pretrained_encoder`
    reads it back."""
    if is_dinov2_encoder(variables):
        state = dinov2.encoder_to_state_dict(variables["params"]["backbone"], layout="dinov2")
    else:
        state = release.encoder_state_dict(variables)
    path = os.fspath(path)
    if path.endswith(".npz"):
        np.savez(path, **state)
    else:
        save_pth(state, path)


def save_official_checkpoint(variables: Mapping, path: str | os.PathLike, *, epoch: int = 0,
                             previous_best: float = 0.0) -> None:
    """Writes `variables` as the release's `latest.pth` (`model` keys prefixed `module.`)."""
    save_pth(release.official_checkpoint(variables, epoch=epoch, previous_best=previous_best),
             path)
