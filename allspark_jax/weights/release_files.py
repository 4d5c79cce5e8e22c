"""The release's weight files, read and written without torch: state dicts in `.npz` (numpy.savez)
or `.pth` / `.pt` (torch.save) files, official training checkpoints (`latest.pth` / `best.pth`)
and SegFormer ImageNet encoders (`mit_bX.pth`). Names and layouts: `allspark_jax.weights.release`.
The same containers hold the DINOv2 family's files (names and layouts:
`allspark_jax.weights.dinov2`):
UniMatch V2's checkpoints (its DPT model's state dict, plain or in its trainer's `latest.pth` /
`best.pth` with `model` and `model_ema`) and facebookresearch's `dinov2_vit*14_pretrain.pth`
encoders; `save_pretrained_encoder` writes the encoder of either family in its file's names.

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


EMA_ENTRY = "model_ema"  # the EMA model's entry of UniMatch V2's trainer checkpoints


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and all(isinstance(v, np.ndarray) for v in obj.values())


def read_pth_checkpoint(path: str | os.PathLike
                        ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """(state dict, EMA state dict or None) of a torch.save file: a plain state dict, a training
    checkpoint's `model` entry (the release's and UniMatch V2's `latest.pth` / `best.pth`) and,
    when it has one, its `model_ema` entry (UniMatch V2's EMA teacher), or an mmseg-style
    checkpoint's `state_dict` entry.

    Raises FileNotFoundError if there is no such file, WeightImportError (a PthFormatError for the
    container) naming the file otherwise.
    """
    path = os.fspath(path)
    obj = load_pth(path)  # a PthFormatError is a WeightImportError naming the file
    ema = None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        ema = obj.get(EMA_ENTRY)
        if ema is not None and not _is_state_dict(ema):
            raise WeightImportError(f"{path}: its {EMA_ENTRY!r} entry is no state dict "
                                    f"(name -> tensor)")
        obj = obj["model"]  # official latest.pth / best.pth
    elif isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # mmseg-style checkpoints
    if not _is_state_dict(obj):
        raise WeightImportError(f"{path}: expected a state dict (name -> tensor), an official "
                                f"checkpoint with a 'model' entry, or a dict with 'state_dict'")
    return obj, ema


def read_pth(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The state dict of a torch.save file (`read_pth_checkpoint`'s first entry)."""
    return read_pth_checkpoint(path)[0]


def _save_state(state: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """`.npz` when `path` ends so, else torch.save's format."""
    path = os.fspath(path)
    if path.endswith(".npz"):
        np.savez(path, **state)
    else:
        save_pth(dict(state), path)


def save_pretrained_encoder(variables: Mapping, path: str | os.PathLike) -> None:
    """Writes the encoder of `variables` as its family's pretrained file: a SegFormer `mit_bX.pth`
    state dict (MiT: encoder keys without prefix), or facebookresearch's
    `dinov2_vit*14_pretrain.pth` keys (DINOv2, what UniMatch V2 loads): `.npz` when `path` ends so,
    else torch.save's format. The loader's `load_pretrained_encoder` reads it back."""
    if dinov2.holds_dinov2(variables):
        state = dinov2.encoder_to_state_dict(variables["params"]["backbone"], layout="dinov2")
    else:
        state = release.encoder_state_dict(variables)
    _save_state(state, path)


def save_official_checkpoint(variables: Mapping, path: str | os.PathLike, *, epoch: int = 0,
                             previous_best: float = 0.0) -> None:
    """Writes `variables` (a MiT model's) as the release's `latest.pth` (`model` keys prefixed
    `module.`)."""
    if dinov2.holds_dinov2(variables):
        raise WeightImportError(f"{os.fspath(path)}: the AllSpark release has no DINOv2 models; "
                                f"write UniMatch V2's checkpoint with save_unimatch_checkpoint")
    save_pth(release.official_checkpoint(variables, epoch=epoch, previous_best=previous_best),
             path)


def save_unimatch_checkpoint(variables: Mapping, path: str | os.PathLike, *,
                             ema: Mapping | None = None, epoch: int = 0,
                             previous_best: float = 0.0, previous_best_ema: float = 0.0) -> None:
    """Writes a DINOv2 model's `variables` as UniMatch V2's DPT state dict (`backbone.*` +
    `head.*`, what its `DPT.load_state_dict` takes; AllSpark on DINOv2 adds `allspark.*`, the
    release's module names, Semantic Memory included): `.npz` when `path` ends so, else
    torch.save's format. The loader reads it back as a whole model (`load_variables`,
    `--checkpoint`).

    With `ema` (the EMA teacher's variables) it writes UniMatch V2's trainer checkpoint instead,
    its `latest.pth` object (torch.save's format only): `model` and `model_ema` (keys prefixed
    `module.`, as its DDP model saves them), an empty `optimizer`, `epoch`, `previous_best`,
    `previous_best_ema`, `best_epoch`, `best_epoch_ema`; `--checkpoint` evaluates `model` as
    'student' and `model_ema` as 'ema'. A teacher without a Semantic Memory of its own (the
    AllSpark module's teacher does not read one) is written with the student's, so that both
    entries hold the same keys."""
    path = os.fspath(path)
    if not dinov2.holds_dinov2(variables):
        raise WeightImportError(f"{path}: UniMatch V2's checkpoints hold DINOv2 "
                                f"models; these variables are a MiT model's "
                                f"(save_official_checkpoint writes the release's)")
    state = dinov2.variables_to_state_dict(variables)
    if ema is None:
        _save_state(state, path)
        return
    if path.endswith(".npz"):
        raise WeightImportError(f"{path}: UniMatch V2's trainer checkpoint (model + model_ema) is "
                                f"a torch.save file; name it .pth, or leave out ema= for a "
                                f"state dict")
    if "memory" in variables and "memory" not in ema:
        ema = {**ema, "memory": variables["memory"]}
    prefixed = lambda sd: {f"module.{k}": v for k, v in sd.items()}  # noqa: E731
    save_pth({"model": prefixed(state),
              EMA_ENTRY: prefixed(dinov2.variables_to_state_dict(ema)),
              "optimizer": {"state": {}, "param_groups": []}, "epoch": epoch,
              "previous_best": previous_best, "previous_best_ema": previous_best_ema,
              "best_epoch": epoch, "best_epoch_ema": epoch}, path)
