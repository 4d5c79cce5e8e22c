"""TensorFlow Datasets builders: `allspark_pascal`, `allspark_cityscapes`, `allspark_coco`,
`allspark_synthetic` (manual download: the data root in the official layout is the manual dir).

    tfds build --imports allspark_jax.data.tfds_builders allspark_pascal \
        --manual_dir /data/pascal --data_dir ~/tensorflow_datasets --file_format array_record
or  python -m allspark_jax.data.prepare --name pascal --root /data/pascal --data_dir ~/tensorflow_datasets
(the `tfds` CLI of tensorflow-datasets 4.9.10 imports apache_beam at start-up, which this project does
not depend on; `prepare` needs nothing beyond tensorflow-datasets and array_record).

Splits: `train` (every training image any split list can name) and `val`. Each example:
  image       string  the original encoded image file (JPEG/PNG bytes, not re-encoded)
  mask        string  a grayscale PNG of the labels (palette masks re-encoded), b'' if the image has none
  image_path  string  path relative to the data root, as in the split lists
  mask_path   string  likewise ('' if none)
  index       int64   the position of the example in its split
Records are written in `index` order (shuffling disabled) in ArrayRecord format, so the input pipeline
reads them by random access with exactly the same epoch order and augmentation seeds as the
direct-from-files path; `info.metadata['image_paths'][split]` maps list paths to indices.

Which images: `train` is the union of the split lists (Pascal: `train_aug.txt` and every official split;
Cityscapes: every official split; COCO: every `train2017/*.jpg`; synthetic: `<root>/splits/*`), `val`
the `val.txt` list. A `splits/` folder in the data root (same structure as the package's) replaces
the official lists, for custom splits. Every image is decoded and every mask checked at build time
(sizes equal, labels < num_classes or 255): errors name the file.
"""
from __future__ import annotations

import io
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from allspark_jax.data import datasets
from allspark_jax.errors import DataError
from allspark_jax.data import splits as splits_lib
from allspark_jax.data.host_tensorflow import tf


_INSTRUCTIONS = """Pass the data root in the official layout (README, "Preparing the datasets") as the manual dir:
`tfds build ... --manual_dir ROOT` or `python -m allspark_jax.data.prepare --root ROOT`."""

BUILDER_NAMES = {"pascal": "allspark_pascal", "cityscapes": "allspark_cityscapes",
                 "coco": "allspark_coco", "synthetic": "allspark_synthetic"}


def _lists_dir(name: str, root: str) -> str:
    own = os.path.join(root, "splits")
    if os.path.isdir(own):
        return own
    return splits_lib.splits_dir(name, root)


def train_pairs(name: str, root: str) -> list[tuple[str, str]]:
    """Every training (image, mask) pair of dataset `name` under `root`, sorted by image path."""
    pairs: dict[str, str] = {}
    if name == "coco":
        for image, mask in datasets.list_coco_unlabeled(root, []):
            pairs[image] = mask if os.path.isfile(os.path.join(root, mask)) else ""
    d = _lists_dir(name, root)
    files = [os.path.join(d, "train_aug.txt")] if name == "pascal" else []
    for s in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        for f in ("labeled.txt", "unlabeled.txt"):
            files.append(os.path.join(d, s, f))
    for f in files:
        if os.path.isfile(f):
            for image, mask in splits_lib.read_list(f):
                pairs.setdefault(image, mask)
    if not pairs:
        raise DataError(f"no training list found for dataset {name!r} in {d!r}.")
    return sorted(pairs.items())


def val_pairs(name: str, root: str) -> list[tuple[str, str]]:
    return splits_lib.read_list(os.path.join(_lists_dir(name, root), "val.txt"))


def _check_and_encode(root: str, image_rel: str, mask_rel: str, num_classes: int
                      ) -> tuple[bytes, bytes]:
    """Reads the image bytes and the mask (re-encoded as grayscale PNG), validating both."""
    image_path = os.path.join(root, image_rel)
    if not os.path.isfile(image_path):
        raise DataError(f"image {image_path!r} does not exist (named in a split list of {root!r}).")
    with open(image_path, "rb") as f:
        image_bytes = f.read()
    try:
        im = Image.open(io.BytesIO(image_bytes))
        im.load()
    except Exception as e:  # PIL raises many types for corrupt files
        raise DataError(f"unreadable image {image_path!r} (expected a JPEG or PNG): {e}") from e
    if im.format not in ("JPEG", "PNG"):
        raise DataError(f"unreadable image {image_path!r}: format {im.format}, expected JPEG or PNG.")
    if not mask_rel:
        return image_bytes, b""
    mask_path = os.path.join(root, mask_rel)
    if not os.path.isfile(mask_path):
        raise DataError(f"mask {mask_path!r} does not exist (named in a split list of {root!r}).")
    try:
        m = Image.open(mask_path)
        m.load()
    except Exception as e:
        raise DataError(f"unreadable mask {mask_path!r} (expected a PNG): {e}") from e
    if m.mode not in ("P", "L"):
        raise DataError(f"mask {mask_path!r} has mode {m.mode}; expected a palette or grayscale PNG.")
    labels = np.asarray(m, dtype=np.uint8)
    if labels.shape != (im.size[1], im.size[0]):
        raise DataError(f"image/mask size mismatch: {image_path!r} is {im.size[1]}x{im.size[0]} but "
                        f"{mask_path!r} is {labels.shape[0]}x{labels.shape[1]} (expected equal).")
    bad = (labels >= num_classes) & (labels != datasets.IGNORE_INDEX)
    if bad.any():
        raise DataError(f"mask {mask_path!r} holds label {int(labels[bad].max())}; expected labels in "
                        f"[0, {num_classes - 1}] or 255 (ignore).")
    buf = io.BytesIO()
    Image.fromarray(labels, mode="L").save(buf, format="PNG")
    return image_bytes, buf.getvalue()


class _AllSparkBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Common builder; subclasses set DATASET."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
    DATASET = ""
    # Set explicitly: TFDS's own lookup of a builder's source file needs the `importlib_resources`
    # backport, which is not a dependency of this project.
    code_path = epath.Path(__file__)

    def __init__(self, *args, file_format=None, **kwargs):
        super().__init__(*args, file_format=file_format or "array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=f"AllSpark {self.DATASET} segmentation (see allspark_jax.data.tfds_builders).",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(), dtype=tf.string),
                "mask": tfds.features.Tensor(shape=(), dtype=tf.string),
                "image_path": tfds.features.Text(),
                "mask_path": tfds.features.Text(),
                "index": tfds.features.Scalar(dtype=tf.int64),
            }),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
        )

    def _num_classes(self, root: str) -> int:
        if self.DATASET == "synthetic":
            return len(datasets.synthetic_class_names(root))
        return datasets.layout(self.DATASET).num_classes

    def _split_generators(self, dl_manager):
        root = datasets.check_root(os.fspath(dl_manager.manual_dir), "manual_dir (data root)")
        num_classes = self._num_classes(root)
        pairs = {"train": train_pairs(self.DATASET, root), "val": val_pairs(self.DATASET, root)}
        self.info.metadata["image_paths"] = {k: [p[0] for p in v] for k, v in pairs.items()}
        self.info.metadata["num_classes"] = num_classes
        if self.DATASET == "synthetic":
            self.info.metadata["class_names"] = datasets.synthetic_class_names(root)
        return {k: self._generate_examples(root, v, num_classes) for k, v in pairs.items()}

    def _generate_examples(self, root, pairs, num_classes):
        for i, (image_rel, mask_rel) in enumerate(pairs):
            image, mask = _check_and_encode(root, image_rel, mask_rel, num_classes)
            yield i, {"image": image, "mask": mask, "image_path": image_rel,
                      "mask_path": mask_rel if mask else "", "index": i}


class AllsparkPascal(_AllSparkBuilder):
    """Pascal VOC 2012 (+SBD) for AllSpark: JPEGImages/, SegmentationClass/."""
    DATASET = "pascal"


class AllsparkCityscapes(_AllSparkBuilder):
    """Cityscapes for AllSpark: leftImg8bit/, gtFine/*_labelTrainIds.png."""
    DATASET = "cityscapes"


class AllsparkCoco(_AllSparkBuilder):
    """COCO 2017 (81 classes) for AllSpark: train2017/, val2017/, masks/."""
    DATASET = "coco"


class AllsparkSynthetic(_AllSparkBuilder):
    """The synthetic dataset of allspark_jax.data.synthetic (Pascal layout)."""
    DATASET = "synthetic"


BUILDERS = {"pascal": AllsparkPascal, "cityscapes": AllsparkCityscapes, "coco": AllsparkCoco,
            "synthetic": AllsparkSynthetic}


def builder(name: str, data_dir: str | None = None) -> _AllSparkBuilder:
    """The builder of dataset `name` ('pascal' | 'cityscapes' | 'coco' | 'synthetic')."""
    datasets.layout(name)
    return BUILDERS[name](data_dir=data_dir)


def open_prepared(name: str, data_dir: str | None = None) -> _AllSparkBuilder:
    """The builder of dataset `name` whose records are prepared in `data_dir`; DataError otherwise."""
    b = builder(name, data_dir=data_dir)
    if not b.is_prepared():
        raise DataError(
            f"data.source='tfds' but no prepared {BUILDER_NAMES[name]} records at "
            f"{os.fspath(b.data_dir)!r} (data.tfds_data_dir={data_dir!r}); expected "
            f"`python -m allspark_jax.data.prepare --name {name} --root DATA_ROOT"
            f"{' --data_dir ' + str(data_dir) if data_dir else ''}` to have been run.")
    return b
