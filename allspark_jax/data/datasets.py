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
* ``custom``: any layout. The labeled, unlabeled and validation lists (``data.split``,
  ``data.unlabeled_split``, ``data.val_split``) and ``data.custom.class_names`` (one name per line,
  line k naming class k) are files, absolute or relative to the root; unlabeled lines may hold the
  image alone. Masks are grayscale PNGs of class ids, or palette PNGs whose colours are those of
  ``data.custom.palette`` (``R G B`` per line, class k on line k, an optional last line for ignored
  pixels; default the VOC colour map); ``data.custom.ignore_index`` is the mask value of ignored
  pixels (mapped to 255 when decoded).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np
from etils import epath

from allspark_jax.errors import DataError

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

IGNORE_INDEX = 255  # the label of pixels that no loss or metric counts (VOC's object borders)
# ImageNet statistics every image is normalised with (pixels in [0, 1], per RGB channel).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class DatasetLayout:
    """A dataset's name and class count (0: read from the data root, as for 'synthetic')."""
    name: str
    num_classes: int


LAYOUTS = {
    "pascal": DatasetLayout("pascal", len(VOC_CLASSES)),
    "cityscapes": DatasetLayout("cityscapes", len(CITYSCAPES_CLASSES)),
    "coco": DatasetLayout("coco", len(COCO_CLASSES)),
    "synthetic": DatasetLayout("synthetic", 0),
    "custom": DatasetLayout("custom", 0),
}


def layout(name: str) -> DatasetLayout:
    """Returns the layout of dataset `name`, or raises DataError naming `data.name`."""
    if name not in LAYOUTS:
        raise DataError(f"data.name={name!r} is not a known dataset; expected one of {sorted(LAYOUTS)}.")
    return LAYOUTS[name]


def absolute_path(path: str) -> str:
    """`path` made absolute, unless it is a URL (`gs://...`), which `etils.epath` opens as it is."""
    path = os.fspath(path)
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def check_root(root: str | None, option: str = "data.root") -> str:
    """Returns `root` as an absolute path after checking that it is an existing directory."""
    if not root:
        raise DataError(f"{option} is not set; expected the path of a data root in the official layout.")
    root = absolute_path(root)
    if not epath.Path(root).is_dir():
        raise DataError(f"{option}={root!r} does not exist or is not a directory; expected the data root "
                        "(the folder the split list lines are relative to).")
    return root


def read_class_names(path: str, expected: str) -> list[str]:
    """The class names of a file, one per line (blank lines skipped); `expected` says what the
    file should be in the error when it is missing or empty."""
    if not epath.Path(path).is_file():
        raise DataError(f"{path!r} does not exist; expected {expected}.")
    names = [line.strip() for line in epath.Path(path).read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path!r} names no class; expected {expected}.")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"{path!r} names class(es) {dup} more than once; expected {expected}.")
    return names


def synthetic_class_names(root: str) -> list[str]:
    """Reads `<root>/class_names.txt` (one name per line) written by the synthetic dataset writer."""
    return read_class_names(os.path.join(root, "class_names.txt"),
                            "the class name file the synthetic writer (python -m "
                            "allspark_jax.data.synthetic) puts in its data root")


def root_relative(root: str, path: str) -> str:
    """`path` if absolute (or a URL), else `path` under the data root (custom datasets' files)."""
    path = os.fspath(path)
    if "://" in path or os.path.isabs(os.path.expanduser(path)):
        return absolute_path(path)
    return os.path.join(root, path)


def read_palette(path: str, num_classes: int) -> tuple[tuple[int, int, int], ...]:
    """A palette file: `R G B` (0..255) per line, class k on line k, and an optional last line
    colouring ignored pixels; returns those num_classes (or num_classes + 1) colours."""
    expected = (f"{num_classes} lines 'R G B' (0..255; line k colours class k, "
                "data.num_classes lines) and an optional last line for ignored pixels")
    if not epath.Path(path).is_file():
        raise DataError(f"data.custom.palette={path!r} does not exist; expected a file of {expected}.")
    colours = []
    for lineno, line in enumerate(epath.Path(path).read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        try:
            rgb = tuple(int(f) for f in fields)
        except ValueError:
            rgb = ()
        if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
            raise DataError(f"{path}:{lineno}: expected 'R G B' with 0..255 each, got {line.strip()!r}.")
        colours.append(rgb)
    if len(colours) not in (num_classes, num_classes + 1):
        raise DataError(f"{path!r} has {len(colours)} colours; expected {expected}.")
    if len(set(colours)) != len(colours):
        raise DataError(f"{path!r} gives two entries the same colour; palette PNG masks could not be "
                        "decoded, expected distinct colours.")
    return tuple(colours)


def class_names_for(name: str, root: str | None = None, tfds_metadata=None,
                    class_names_file: str | None = None) -> list[str]:
    """Class names of a dataset (VOC 21, Cityscapes 19, COCO 81 incl. background).

    'synthetic' reads its own from `<root>/class_names.txt`, or from the metadata of its TFDS
    records (`tfds_metadata`) when it has no root; 'custom' from `class_names_file`
    (data.custom.class_names, absolute or relative to `root`).
    """
    if name == "pascal":
        return list(VOC_CLASSES)
    if name == "cityscapes":
        return list(CITYSCAPES_CLASSES)
    if name == "coco":
        return list(COCO_CLASSES)
    layout(name)  # raises for an unknown name
    if name == "custom":
        if not class_names_file:
            raise DataError("data.custom.class_names is not set; expected the path (absolute or "
                            "relative to data.root) of a file with one class name per line.")
        return read_class_names(root_relative(check_root(root), class_names_file),
                                "data.custom.class_names: one class name per line, line k naming "
                                "class k")
    if tfds_metadata is not None and not root:
        return list(tfds_metadata["class_names"])
    return synthetic_class_names(check_root(root))


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
        if not epath.Path(root, image).is_file():
            missing.append(image)
        if require_masks and not mask:
            raise DataError(f"{source} names no mask for labeled image {image!r}; expected "
                            "'image_path mask_path' lines.")
        if require_masks and not epath.Path(root, mask).is_file():
            missing.append(mask)
    if missing:
        raise DataError(
            f"{len(missing)} file(s) named in {source} are missing under data.root={root!r}; the first is "
            f"{os.path.join(root, missing[0])!r}. Expected the data root in the official layout (each list "
            "line is 'image_path mask_path' relative to the root).")


def list_coco_unlabeled(root: str, labeled: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Every `train2017/*.jpg` under `root` not in `labeled`, sorted, paired with `masks/<id>.png`."""
    folder = epath.Path(root, "train2017")
    if not folder.is_dir():
        raise DataError(f"{os.fspath(folder)!r} does not exist; COCO's unlabeled set is every image of the data "
                        "root's train2017/ folder not in the labeled list, so data.root must hold train2017/.")
    taken = {image for image, _ in labeled}
    out = []
    for fname in sorted(p.name for p in folder.iterdir()):
        if not fname.lower().endswith((".jpg", ".jpeg", ".png")):
            continue
        image = f"train2017/{fname}"
        if image not in taken:
            out.append((image, coco_mask_path(image)))
    return out


def coco_mask_path(image_path: str) -> str:
    """COCO's mask of an image: `train2017/<id>.jpg` -> `masks/<id>.png` (paths relative to the root)."""
    return f"masks/{os.path.splitext(os.path.basename(image_path))[0]}.png"


# ------------------------------------------------------------------------------ palettes (numpy)

CITYSCAPES_COLORS = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32))


def voc_palette() -> np.ndarray:
    """The 256-entry VOC colour map, (256, 3) uint8 (index 255 is (224, 224, 192))."""
    idx = np.arange(256)
    pal = np.zeros((256, 3), np.int64)
    for j in range(8):  # bit-plane loop (8 iterations), not a pixel loop
        for c in range(3):
            pal[:, c] |= ((idx >> (3 * j + c)) & 1) << (7 - j)
    return pal.astype(np.uint8)


def palette_array(colours, num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """A custom palette (`read_palette`'s colours) as a 256-entry colour map, (256, 3) uint8: class
    k's colour at k, the ignore colour (when given) at `ignore_index`, the VOC map elsewhere."""
    pal = voc_palette().copy()
    pal[:num_classes] = np.asarray(colours[:num_classes], np.uint8)
    if len(colours) > num_classes:
        pal[ignore_index] = colours[num_classes]
    return pal


def palette(dataset: str, opts=None) -> np.ndarray:
    """(256, 3) uint8 colour map for `dataset` (a custom one's from its DataOptions `opts`): VOC's
    for Pascal / COCO / synthetic, Cityscapes' (black above class 18, 255 VOC's) for Cityscapes."""
    if opts is not None and opts.palette is not None:
        return palette_array(opts.palette, opts.num_classes, opts.ignore_index)
    pal = voc_palette().copy()
    if dataset == "cityscapes":
        pal[:len(CITYSCAPES_COLORS)] = np.array(CITYSCAPES_COLORS, np.uint8)
        pal[len(CITYSCAPES_COLORS):255] = 0
    return pal
