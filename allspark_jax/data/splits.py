"""Resolution of split names and list files into (image_path, mask_path) lists.

Official split lists ship in ``allspark_jax/data/splits/<dataset>/`` (``<split>/labeled.txt``,
``<split>/unlabeled.txt``, ``val.txt``; COCO has no ``unlabeled.txt``). The synthetic dataset keeps
the same structure in ``<root>/splits/``. A split may also be given as the path of a list file;
for the ``custom`` dataset every list is a file, absolute or relative to the data root.
"""
from __future__ import annotations

import dataclasses
import os

from etils import epath

from allspark_jax.data import datasets
from allspark_jax.errors import DataError

PACKAGE_SPLITS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "splits")

Pairs = list[tuple[str, str]]


def splits_dir(name: str, root: str | None = None) -> str:
    """The folder holding dataset `name`'s split lists (package's; the synthetic root's own)."""
    datasets.layout(name)
    if name == "synthetic":
        return os.path.join(datasets.check_root(root), "splits")
    return os.path.join(PACKAGE_SPLITS, name)


def available_splits(name: str, root: str | None = None) -> list[str]:
    """Names of the labeled splits of dataset `name` (folders holding a labeled.txt)."""
    d = splits_dir(name, root)
    if not epath.Path(d).is_dir():
        return []
    return sorted(p.name for p in epath.Path(d).iterdir() if (p / "labeled.txt").is_file())


def read_list(path: str) -> Pairs:
    """Reads a list file of `image_path mask_path` lines (blank lines skipped).

    A line with a single field is taken as an image without a mask (mask path '').
    Raises DataError naming the file for a missing file or a malformed line.
    """
    if not epath.Path(path).is_file():
        raise DataError(f"list file {path!r} does not exist; expected a text file of "
                        "'image_path mask_path' lines relative to data.root.")
    out = []
    for lineno, line in enumerate(epath.Path(path).read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) > 2:
            raise DataError(f"{path}:{lineno}: expected 'image_path mask_path', got {line.strip()!r}.")
        out.append((fields[0], fields[1] if len(fields) == 2 else ""))
    if not out:
        raise DataError(f"list file {path!r} is empty; expected 'image_path mask_path' lines.")
    return out


def _is_path(split: str) -> bool:
    return os.sep in split or split.endswith(".txt") or epath.Path(split).is_file()


def custom_list_path(root: str | None, value, key: str) -> str:
    """The list file `value` of a custom dataset (absolute, or relative to the root), checked."""
    if not value:
        raise DataError(f"{key} is not set; data.name='custom' needs the path of a list file "
                        "(absolute or relative to data.root).")
    path = datasets.root_relative(datasets.check_root(root), str(value))
    if not epath.Path(path).is_file():
        raise DataError(f"{key}={value!r}: list file {path!r} does not exist; data.name='custom' "
                        "expects the path of a list file, absolute or relative to data.root.")
    return path


def _check_masks(pairs: Pairs, source: str) -> None:
    """Raises DataError naming the first image of a labeled / validation list without a mask."""
    unmasked = [image for image, mask in pairs if not mask]
    if unmasked:
        raise DataError(f"{source} names no mask for {len(unmasked)} image(s), the first "
                        f"{unmasked[0]!r}; labeled and validation lists need 'image_path mask_path' "
                        "lines (only unlabeled lists may hold the image alone).")


@dataclasses.dataclass
class TrainSplit:
    """The labeled and unlabeled lists of a training split.

    Attributes:
      labeled / unlabeled: (image_path, mask_path) lists, paths relative to the data root.
      labeled_source / unlabeled_source: where each came from (a file path or a description;
        '' and no unlabeled pairs when resolved `labeled_only`).
    """
    labeled: Pairs
    unlabeled: Pairs
    labeled_source: str
    unlabeled_source: str


def resolve_train_split(name: str, split: str, unlabeled_split: str | None = None,
                        root: str | None = None,
                        coco_train_images: list[str] | None = None,
                        labeled_only: bool = False) -> TrainSplit:
    """Resolves `data.split` / `data.unlabeled_split` into lists.

    Args:
      name: dataset name (`data.name`).
      split: a split name (e.g. '1_16', '92', 'u2pl_1_8', '1_512') or the path of a labeled list file.
      unlabeled_split: optional path of an unlabeled list file (or a split name whose unlabeled list is
        used). Default: the split's own unlabeled list -- `unlabeled.txt` beside a labeled list file, or
        for COCO every `train2017/*.jpg` under `root` not in the labeled list.
      root: the data root (needed for COCO's unlabeled listing and the synthetic dataset).
      coco_train_images: COCO's train2017 image paths when they come from somewhere other than the
        root's folder (the TFDS records); default: list `<root>/train2017/`.
      labeled_only: resolve the labeled list alone (config.method 'supervised'): no unlabeled list
        is looked for or read; the split's `unlabeled` is empty.
    """
    if not split:
        raise DataError(f"data.split is not set; expected one of {available_splits(name, root)} "
                        "or the path of a labeled list file.")
    split = str(split)
    if name == "custom":
        split = custom_list_path(root, split, "data.split")
        if unlabeled_split:
            unlabeled_split = custom_list_path(root, unlabeled_split, "data.unlabeled_split")
    if _is_path(split):
        labeled_path = datasets.absolute_path(split)
        if not epath.Path(labeled_path).is_file():
            raise DataError(f"data.split={split!r}: list file does not exist; expected a split name "
                            f"({', '.join(available_splits(name, root))}) or the path of a labeled list.")
        default_unlabeled = os.path.join(os.path.dirname(labeled_path), "unlabeled.txt")
    else:
        d = splits_dir(name, root)
        labeled_path = os.path.join(d, split, "labeled.txt")
        if not epath.Path(labeled_path).is_file():
            raise DataError(f"data.split={split!r} is not a split of dataset {name!r}; expected one of "
                            f"{available_splits(name, root)} or the path of a labeled list file.")
        default_unlabeled = os.path.join(d, split, "unlabeled.txt")
    labeled = read_list(labeled_path)
    _check_masks(labeled, labeled_path)

    if labeled_only:
        return TrainSplit(labeled, [], labeled_path, "")
    if unlabeled_split:
        u = str(unlabeled_split)
        if _is_path(u):
            unlabeled_path = datasets.absolute_path(u)
        else:
            unlabeled_path = os.path.join(splits_dir(name, root), u, "unlabeled.txt")
            if not epath.Path(unlabeled_path).is_file():
                raise DataError(f"data.unlabeled_split={u!r} is not a split of dataset {name!r} with an "
                                f"unlabeled list; expected a path of an unlabeled list file.")
        unlabeled = read_list(unlabeled_path)
        unlabeled_source = unlabeled_path
    elif epath.Path(default_unlabeled).is_file():
        unlabeled = read_list(default_unlabeled)
        unlabeled_source = default_unlabeled
    elif name == "coco" and coco_train_images is not None:
        taken = {image for image, _ in labeled}
        unlabeled = [(p, datasets.coco_mask_path(p)) for p in coco_train_images if p not in taken]
        unlabeled_source = f"the TFDS train records (images not in {labeled_path})"
    elif name == "coco":
        root = datasets.check_root(root)
        unlabeled = datasets.list_coco_unlabeled(root, labeled)
        unlabeled_source = f"{root}/train2017/ (images not in {labeled_path})"
        if not unlabeled:
            raise DataError(f"{unlabeled_source} holds no image; expected COCO train2017 JPEGs.")
    else:
        raise DataError(f"no unlabeled list for data.split={split!r}: {default_unlabeled!r} does not "
                        "exist; set data.unlabeled_split to the path of an unlabeled list file.")
    return TrainSplit(labeled, unlabeled, labeled_path, unlabeled_source)


def resolve_val_split(name: str, val_split: str | None = "val", root: str | None = None
                      ) -> tuple[Pairs, str]:
    """Resolves `data.val_split` ('val' or the path of a list file) into (pairs, source path)."""
    val_split = str(val_split or "val")
    if name == "custom":
        val_split = custom_list_path(root, val_split, "data.val_split")
    if _is_path(val_split):
        path = datasets.absolute_path(val_split)
    else:
        path = os.path.join(splits_dir(name, root), f"{val_split}.txt")
        if not epath.Path(path).is_file():
            raise DataError(f"data.val_split={val_split!r} is not a validation list of dataset {name!r} "
                            f"({path!r} does not exist); expected 'val' or the path of a list file.")
    pairs = read_list(path)
    _check_masks(pairs, path)
    return pairs, path
