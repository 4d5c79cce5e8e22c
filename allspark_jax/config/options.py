"""The data options of a run (`DataOptions`), resolved once from `config.data` by `data_options`.

The input pipelines take DataOptions, never the config. A field named as a `config.data` key takes
that key's value (converted to the field's type), so a new data key is added to configs/default.py
and to DataOptions; the other fields are resolved here (root, class names, palette, seed, method).
"""
from __future__ import annotations

import dataclasses
import os

from allspark_jax import method as method_lib
from allspark_jax.config.validation import validate_data
from allspark_jax.data import datasets
from allspark_jax.errors import DataError
from allspark_jax.workdir import SYNTHETIC_DIR


@dataclasses.dataclass(frozen=True)
class DataOptions:
    """The data keys of a run, resolved (`data_options`). Field meanings: configs/default.py.

    `root` is absolute (or None for source 'tfds' without a root); `class_names` are the dataset's,
    checked against `data.num_classes`; `seed` is the run's seed (epoch order and augmentation);
    `ignore_index` is the mask value of ignored pixels in the files (255 but for custom datasets)
    and `palette` a custom dataset's colours (class k's at k, then optionally the ignore colour;
    None: the VOC colour map); `method` says whether epochs walk the labeled list alone and which
    view of the unlabeled images the student sees (`method.Method`).
    """

    # config.data.<field>
    name: str
    split: str
    unlabeled_split: str | None
    val_split: str
    num_classes: int
    crop_size: int
    batch_size: int
    source: str
    tfds_data_dir: str | None
    labeled_strong: bool
    scale_range: tuple[float, float]
    check_files: str
    max_image_pixels: int
    num_parallel_calls: int
    prefetch: int
    # resolved
    root: str | None
    class_names: tuple[str, ...]
    seed: int
    ignore_index: int
    palette: tuple[tuple[int, int, int], ...] | None
    method: method_lib.Method


_RESOLVED = ("root", "class_names", "seed", "ignore_index", "palette", "method")
_CONVERT = {"int": int, "float": float, "str": str, "bool": bool,
            "tuple[float, float]": lambda v: tuple(float(x) for x in v)}


def _data_fields(data) -> dict:
    """The DataOptions fields named as `config.data` keys, converted to the fields' types."""
    out = {}
    for field in dataclasses.fields(DataOptions):
        if field.name in _RESOLVED:
            continue
        value = data[field.name]
        convert = _CONVERT.get(field.type)
        out[field.name] = convert(value) if convert is not None and value is not None else value
    return out


def synthetic_root(config, workdir: str | None) -> str | None:
    """The data root a run reads: data.root, or <workdir>/synthetic_data for an unrooted synthetic."""
    if config.data.root or config.data.name != "synthetic" or config.data.source == "tfds":
        return config.data.root
    if not workdir:
        raise DataError("config.data.root is not set; data.name='synthetic' without a root writes "
                        "its dataset into the workdir, and no workdir was given")
    return os.path.join(datasets.absolute_path(workdir), SYNTHETIC_DIR)


def synthetic_style(config):
    """The `allspark_jax.data.synthetic.Style` of `config.data.synthetic`'s style keys."""
    from allspark_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    s = config.data.synthetic
    return synthetic.Style(colours=int(s.colours), max_objects=int(s.max_objects),
                           distractors=int(s.distractors), hue_jitter=float(s.hue_jitter))


def _write_synthetic(config, root: str) -> None:
    """Process 0 writes the synthetic dataset described by data.synthetic; the others wait."""
    import jax  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    from allspark_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    if jax.process_index() == 0:
        s = config.data.synthetic
        synthetic.ensure_dataset(root, num_train=s.num_train, num_val=s.num_val, size=s.size,
                                 num_classes=config.data.num_classes, seed=s.seed,
                                 num_labeled=s.num_labeled, style=synthetic_style(config))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("synthetic data written")


def data_options(config, workdir: str | None = None) -> DataOptions:
    """Resolves `config.data` (and `seed`, the method) into DataOptions; writes the synthetic data
    if asked. Raises DataError naming the option or path when the root, the dataset or its class
    count is wrong."""
    d = config.data
    validate_data(config)
    root = synthetic_root(config, workdir)
    if root != d.root:
        _write_synthetic(config, root)
    if root or d.source == "files":
        root = datasets.check_root(root)
    tfds_meta = None
    if d.name == "synthetic" and d.source == "tfds" and not root:
        from allspark_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top
        tfds_meta = tfds_builders.open_prepared(d.name, d.tfds_data_dir).info.metadata
    names = datasets.class_names_for(d.name, root, tfds_meta, d.custom.class_names)
    if int(d.num_classes) != len(names):
        raise DataError(f"config.data.num_classes={d.num_classes} but dataset {d.name!r} has "
                        f"{len(names)} classes ({', '.join(names[:6])}"
                        f"{', ...' if len(names) > 6 else ''})")
    palette = None
    if d.name == "custom" and d.custom.palette:
        palette = datasets.read_palette(datasets.root_relative(root, d.custom.palette),
                                        len(names))
    return DataOptions(**_data_fields(d), root=root, class_names=tuple(names),
                       seed=int(config.seed), ignore_index=int(d.custom.ignore_index),
                       palette=palette, method=method_lib.from_config(config))
