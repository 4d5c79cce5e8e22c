"""Per-dataset layouts, class names and eager validation of file lists.

Layouts under a data root (every list line is ``image_path mask_path``, both relative to the root):

* ``pascal``: ``JPEGImages/<id>.jpg`` and ``SegmentationClass/<id>.png`` (palette or grayscale PNG whose
  index values are the labels 0..20, 255 = ignore).
* ``cityscapes``: ``leftImg8bit/{train,val}/<city>/<id>_leftImg8bit.png`` and
  ``gtFine/{train,val}/<city>/<id>_gtFine_labelTrainIds.png`` (19 classes, 255 = ignore).
* ``coco``: ``train2017/<id>.jpg`` / ``val2017/<id>.jpg`` and ``masks/<id>.png`` (81 classes including
  background 0, 255 = ignore). The unlabeled set is every ``train2017/*.jpg`` not in the labeled list.
* ``synthetic``: the Pascal layout written by ``allspark_jax.data.synthetic``; its split lists live in
  ``<root>/splits/`` and its class names in ``<root>/class_names.txt``.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor")

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")

COCO_CLASSES = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush")

IGNORE_INDEX = 255


class DataError(ValueError):
    """A bad data root, list, file or option; the message names the culprit and what was expected."""


@dataclasses.dataclass(frozen=True)
class DatasetLayout:
    """Static facts about one dataset's layout under its data root.

    Attributes:
      name: 'pascal' | 'cityscapes' | 'coco' | 'synthetic'.
      num_classes: number of classes including background where the dataset has one.
      train_image_dir: folder (relative to the root) of the training images.
      mask_dir: folder (relative to the root) of the training masks.
      image_ext / mask_ext: file name endings used to pair an image with its mask when listing folders.
    """
    name: str
    num_classes: int
    train_image_dir: str
    mask_dir: str
    image_ext: str
    mask_ext: str


LAYOUTS = {
    "pascal": DatasetLayout("pascal", 21, "JPEGImages", "SegmentationClass", ".jpg", ".png"),
    "cityscapes": DatasetLayout("cityscapes", 19, "leftImg8bit/train", "gtFine/train",
                                "_leftImg8bit.png", "_gtFine_labelTrainIds.png"),
    "coco": DatasetLayout("coco", 81, "train2017", "masks", ".jpg", ".png"),
    "synthetic": DatasetLayout("synthetic", 0, "JPEGImages", "SegmentationClass", ".jpg", ".png"),
}


def layout(name: str) -> DatasetLayout:
    """Returns the layout of dataset `name`, or raises DataError naming `data.name`."""
    if name not in LAYOUTS:
        raise DataError(f"data.name={name!r} is not a known dataset; expected one of {sorted(LAYOUTS)}.")
    return LAYOUTS[name]


def check_root(root: str | None, option: str = "data.root") -> str:
    """Returns `root` as an absolute path after checking that it is an existing directory."""
    if not root:
        raise DataError(f"{option} is not set; expected the path of a data root in the official layout.")
    root = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.isdir(root):
        raise DataError(f"{option}={root!r} does not exist or is not a directory; expected the data root "
                        "(the folder the split list lines are relative to).")
    return root


def synthetic_class_names(root: str) -> list[str]:
    """Reads `<root>/class_names.txt` (one name per line) written by the synthetic dataset writer."""
    path = os.path.join(root, "class_names.txt")
    if not os.path.isfile(path):
        raise DataError(f"{path!r} does not exist; expected the class name file the synthetic writer "
                        "(python -m allspark_jax.data.synthetic) puts in its data root.")
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def class_names_for(name: str, root: str | None = None, num_classes: int | None = None) -> list[str]:
    """Class names of a dataset (VOC 21, Cityscapes 19, COCO 81 incl. background, synthetic: its own)."""
    if name == "pascal":
        names = list(VOC_CLASSES)
    elif name == "cityscapes":
        names = list(CITYSCAPES_CLASSES)
    elif name == "coco":
        names = list(COCO_CLASSES)
    elif name == "synthetic":
        names = synthetic_class_names(check_root(root))
    else:
        layout(name)  # raises
        raise AssertionError
    if num_classes is not None and num_classes != len(names):
        raise DataError(f"data.num_classes={num_classes} does not match dataset {name!r}, which has "
                        f"{len(names)} classes.")
    return names


def check_files_exist(root: str, pairs: Sequence[tuple[str, str]], source: str,
                      require_masks: bool = True) -> None:
    """Checks that every image (and mask, if `require_masks`) of `pairs` exists under `root`.

    Args:
      root: the data root.
      pairs: (image_path, mask_path) relative to `root`.
      source: where the list came from (a list file path or a description), named in the error.
      require_masks: whether missing masks are errors (they are not for unlabeled images).
    Raises:
      DataError naming the first missing file, the list it came from and how many are missing.
    """
    missing = []
    for image, mask in pairs:
        if not os.path.isfile(os.path.join(root, image)):
            missing.append(image)
        if require_masks and not mask:
            raise DataError(f"{source} names no mask for labeled image {image!r}; expected "
                            "'image_path mask_path' lines.")
        if require_masks and not os.path.isfile(os.path.join(root, mask)):
            missing.append(mask)
    if missing:
        raise DataError(
            f"{len(missing)} file(s) named in {source} are missing under data.root={root!r}; the first is "
            f"{os.path.join(root, missing[0])!r}. Expected the data root in the official layout (each list "
            "line is 'image_path mask_path' relative to the root).")


def list_coco_unlabeled(root: str, labeled: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Every `train2017/*.jpg` under `root` not in `labeled`, sorted, paired with `masks/<id>.png`."""
    folder = os.path.join(root, "train2017")
    if not os.path.isdir(folder):
        raise DataError(f"{folder!r} does not exist; COCO's unlabeled set is every image of the data "
                        "root's train2017/ folder not in the labeled list, so data.root must hold train2017/.")
    taken = {image for image, _ in labeled}
    out = []
    for fname in sorted(os.listdir(folder)):
        if not fname.lower().endswith((".jpg", ".jpeg", ".png")):
            continue
        image = f"train2017/{fname}"
        if image not in taken:
            out.append((image, f"masks/{os.path.splitext(fname)[0]}.png"))
    return out


# --------------------------------------------------------------------------- VOC palette (numpy)


def voc_palette() -> np.ndarray:
    """The 256-entry VOC colour map, (256, 3) uint8 (index 255 is (224, 224, 192))."""
    idx = np.arange(256)
    pal = np.zeros((256, 3), np.int64)
    for j in range(8):  # bit-plane loop (8 iterations), not a pixel loop
        for c in range(3):
            pal[:, c] |= ((idx >> (3 * j + c)) & 1) << (7 - j)
    return pal.astype(np.uint8)
