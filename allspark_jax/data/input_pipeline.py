"""The training and validation input pipelines (tf.data on the host, numpy out, jax arrays on device).

Config keys read (`config.data.*` unless noted; default in brackets):
  data.name               'pascal' | 'cityscapes' | 'coco' | 'synthetic'. [required]
  data.root               data root in the official layout; needed by source 'files'. With source
                          'tfds' it is optional, except for 'synthetic' (its split lists live in the
                          root); COCO's default unlabeled set then comes from the records. [None]
  data.split              split name ('92' .. '1464', '1_16' .. '1_2', 'u2pl_1_16', Cityscapes '1_30' ..
                          '1_2', COCO '1_512' .. '1_32', synthetic 'default') or a labeled list path.
                          [required]
  data.unlabeled_split    path of an unlabeled list (or a split name); None = the split's own
                          (`unlabeled.txt` beside a labeled list; COCO: train2017 minus labeled). [None]
  data.val_split          'val' or the path of a validation list. ['val']
  data.num_classes        number of classes; checked against the dataset's. [the dataset's]
  data.crop_size          training crop S. [513]
  data.batch_size         GLOBAL labeled batch; the unlabeled batch is the same size. [8]
  data.source             'files' (decode the data root's files) | 'tfds' (records written by
                          `python -m allspark_jax.data.prepare`). ['files']
  data.tfds_data_dir      TFDS data dir for source 'tfds'. [None = TFDS default]
  data.student_view       'weak' (release: student sees the teacher's view) | 'strong' (student view
                          gets the photometric chain). ['weak']
  data.cutmix_prob        probability of a CutMix box per unlabeled example (0 = off). [0.0]
  data.labeled_strong     give labeled images the strong photometric chain (the release does). [True]
  data.scale_range        random rescale range of the long side. [(0.5, 2.0)]
  data.check_files        check eagerly that every listed file exists (source 'files'). [True]
  data.num_parallel_calls tf.data map parallelism, -1 = AUTOTUNE. [-1]
  data.prefetch           batches prefetched by tf.data. [2]
  seed (top level)        seed of epoch shuffles and augmentation. [0]

Epochs (release semantics): an epoch walks the unlabeled list once in a fresh random order; the labeled
list is repeated `ceil(U / L)` times, truncated to U and permuted afresh each epoch; step t of epoch e
pairs positions [t B, (t + 1) B) of both orders (B = global batch); the last partial batch is dropped,
so steps_per_epoch = U // B. Process p of P takes positions [t B + p b, t B + (p + 1) b), b = B / P,
of every global batch. Every example's augmentation is seeded by (seed, epoch, position), so batches
depend neither on P nor on the source ('files' and 'tfds' give identical batches) and a run started
at `start_step` sees exactly the batches an uninterrupted run would (skipping costs no decoding).
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import os
import re
import threading
from typing import Any, Iterator

import numpy as np
import tensorflow as tf

from allspark_jax.data import augment
from allspark_jax.data import datasets
from allspark_jax.data import splits as splits_lib

DataError = datasets.DataError

_DEFAULTS = {
    "root": None, "unlabeled_split": None, "val_split": "val", "num_classes": None,
    "crop_size": 513, "batch_size": 8, "source": "files", "tfds_data_dir": None,
    "student_view": "weak", "cutmix_prob": 0.0, "labeled_strong": True, "scale_range": (0.5, 2.0),
    "check_files": True, "num_parallel_calls": -1, "prefetch": 2,
}
_SEED_SALT = 0x5EED  # second word of the base seed


def _get(cfg, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if hasattr(cfg, "get"):
        v = cfg.get(key, default)
    else:
        v = getattr(cfg, key, default)
    return default if v is None and default is not None else v


def _opt(config, key: str) -> Any:
    """config.data.<key> with this module's default."""
    data = _get(config, "data")
    if data is None:
        raise DataError("config.data is missing; expected a ConfigDict of data.* options.")
    return _get(data, key, _DEFAULTS.get(key))


def _required(config, key: str) -> Any:
    v = _opt(config, key)
    if v is None or v == "":
        raise DataError(f"data.{key} is not set.")
    return v


def _processes(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # pylint: disable=g-import-not-at-top
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} is not in [0, process_count={process_count}).")
    return int(process_index), int(process_count)


# ----------------------------------------------------------------------------------------- sources


class _FileReader:
    """Reads example i of a list from the data root's files."""

    def __init__(self, root: str, pairs: splits_lib.Pairs):
        self.image_paths = tf.constant([os.path.join(root, p[0]) for p in pairs])
        self.mask_paths = tf.constant([os.path.join(root, p[1]) if p[1] else "" for p in pairs])

    def image(self, i):
        path = tf.gather(self.image_paths, i)
        return tf.io.read_file(path), path

    def mask(self, i):
        path = tf.gather(self.mask_paths, i)
        return tf.io.read_file(path), path


class _TfdsReader:
    """Reads example i of a list from TFDS ArrayRecord records by random access."""

    def __init__(self, source, record_index: np.ndarray, pairs: splits_lib.Pairs, where: str):
        self._source = source
        self._lock = threading.Lock()
        self.records = tf.constant(record_index, tf.int64)
        self.image_paths = tf.constant([f"{where}:{p[0]}" for p in pairs])
        self.mask_paths = tf.constant([f"{where}:{p[1]}" for p in pairs])

    def _fetch(self, record, field: str):
        def fetch(r):
            with self._lock:
                return self._source[int(r)][field]
        out = tf.py_function(fetch, [record], tf.string)
        out.set_shape([])
        return out

    def image(self, i):
        return self._fetch(tf.gather(self.records, i), "image"), tf.gather(self.image_paths, i)

    def mask(self, i):
        return self._fetch(tf.gather(self.records, i), "mask"), tf.gather(self.mask_paths, i)


@dataclasses.dataclass
class _Tfds:
    builder: Any
    where: str

    def paths(self, split: str) -> list[str]:
        return list(self.builder.info.metadata["image_paths"][split])

    def reader(self, split: str, pairs: splits_lib.Pairs, list_source: str) -> _TfdsReader:
        lookup = {p: i for i, p in enumerate(self.paths(split))}
        idx = np.empty(len(pairs), np.int64)
        for j, (image, _) in enumerate(pairs):
            if image not in lookup:
                raise DataError(f"image {image!r} of {list_source} is not in the TFDS records at "
                                f"{self.where} (split {split!r}); expected records prepared from a data "
                                "root holding it (python -m allspark_jax.data.prepare).")
            idx[j] = lookup[image]
        return _TfdsReader(self.builder.as_data_source(split), idx, pairs, f"{self.where}/{split}")


def _open_tfds(config) -> _Tfds:
    from allspark_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top
    name = _required(config, "name")
    data_dir = _opt(config, "tfds_data_dir")
    b = tfds_builders.builder(name, data_dir=data_dir)
    where = os.fspath(b.data_dir)
    if not b.is_prepared():
        raise DataError(f"data.source='tfds' but no prepared {tfds_builders.BUILDER_NAMES[name]} records "
                        f"at {where!r} (data.tfds_data_dir={data_dir!r}); expected "
                        f"`python -m allspark_jax.data.prepare --name {name} --root DATA_ROOT"
                        f"{' --data_dir ' + str(data_dir) if data_dir else ''}` to have been run.")
    return _Tfds(b, where)


def _source_kind(config) -> str:
    source = _opt(config, "source")
    if source not in ("files", "tfds"):
        raise DataError(f"data.source={source!r}; expected 'files' or 'tfds'.")
    return source


def _num_classes(config, tfds_meta=None) -> int:
    name = _required(config, "name")
    n = _opt(config, "num_classes")
    if name == "synthetic":
        if tfds_meta is not None:
            expected = int(tfds_meta.builder.info.metadata["num_classes"])
        else:
            expected = len(datasets.synthetic_class_names(datasets.check_root(_opt(config, "root"))))
    else:
        expected = datasets.layout(name).num_classes
    if n is not None and int(n) != expected:
        raise DataError(f"data.num_classes={n} but dataset {name!r} has {expected} classes.")
    return expected


def class_names(config) -> list[str]:
    """Class names (VOC 21, Cityscapes 19, COCO 81 incl. background; synthetic: its own)."""
    name = _required(config, "name")
    if name == "synthetic" and _source_kind(config) == "tfds" and not _opt(config, "root"):
        names = list(_open_tfds(config).builder.info.metadata["class_names"])
    else:
        names = datasets.class_names_for(name, _opt(config, "root"))
    n = _opt(config, "num_classes")
    if n is not None and int(n) != len(names):
        raise DataError(f"data.num_classes={n} but dataset {name!r} has {len(names)} classes.")
    return names


# ------------------------------------------------------------------------------------------- train


@dataclasses.dataclass
class _TrainPlan:
    split: splits_lib.TrainSplit
    labeled_reader: Any
    unlabeled_reader: Any
    num_classes: int


def _train_plan(config) -> _TrainPlan:
    name = _required(config, "name")
    datasets.layout(name)
    source = _source_kind(config)
    tfds_meta = _open_tfds(config) if source == "tfds" else None
    root = _opt(config, "root")
    if source == "files" or (root and name in ("coco", "synthetic")):
        root = datasets.check_root(root)
    split_name = _required(config, "split")
    unlabeled_split = _opt(config, "unlabeled_split")
    if source == "tfds" and name == "coco" and not unlabeled_split and not root:
        split = splits_lib.resolve_train_split(name, split_name, root=None, unlabeled_split=None,
                                               coco_train_images=tfds_meta.paths("train"))
    else:
        split = splits_lib.resolve_train_split(name, split_name, unlabeled_split, root)
    num_classes = _num_classes(config, tfds_meta)
    if source == "files":
        if _opt(config, "check_files"):
            datasets.check_files_exist(root, split.labeled, split.labeled_source, require_masks=True)
            datasets.check_files_exist(root, split.unlabeled, split.unlabeled_source, require_masks=False)
        lr = _FileReader(root, split.labeled)
        ur = _FileReader(root, split.unlabeled)
    else:
        lr = tfds_meta.reader("train", split.labeled, split.labeled_source)
        ur = tfds_meta.reader("train", split.unlabeled, split.unlabeled_source)
    return _TrainPlan(split, lr, ur, num_classes)


def _global_batch(config, process_count: int) -> tuple[int, int]:
    batch = int(_required(config, "batch_size"))
    if batch <= 0 or batch % process_count:
        raise DataError(f"data.batch_size={batch} (global) is not a positive multiple of the process "
                        f"count {process_count}.")
    return batch, batch // process_count


def _steps(num_unlabeled: int, batch: int, source: str) -> int:
    steps = num_unlabeled // batch
    if steps == 0:
        raise DataError(f"the unlabeled list ({source}) has {num_unlabeled} images, fewer than "
                        f"data.batch_size={batch}; expected at least one full global batch per epoch.")
    return steps


def steps_per_epoch(config, process_count: int | None = None) -> int:
    """Training steps per epoch: unlabeled images // global batch (independent of process_count)."""
    name = _required(config, "name")
    split = _train_plan(config).split if name == "coco" or _source_kind(config) == "tfds" else \
        splits_lib.resolve_train_split(name, _required(config, "split"),
                                       _opt(config, "unlabeled_split"), _opt(config, "root"))
    batch, _ = _global_batch(config, process_count or 1)
    return _steps(len(split.unlabeled), batch, split.unlabeled_source)


def _epoch_positions(epoch, *, seed: int, num_labeled: int, num_unlabeled: int, steps: int,
                     batch: int, local_batch: int, process_index: int, start_epoch: int,
                     start_offset: int) -> dict[str, tf.Tensor]:
    """One epoch's (epoch, position, labeled index, unlabeled index) of this process, in step order."""
    epoch = tf.cast(epoch, tf.int64)
    base = augment.fold_seed(tf.constant([seed, _SEED_SALT], tf.int64), epoch)
    perm_u = tf.random.experimental.stateless_shuffle(
        tf.range(num_unlabeled, dtype=tf.int64), augment.fold_seed(base, 1))
    reps = math.ceil(num_unlabeled / num_labeled)
    labeled_rep = tf.tile(tf.range(num_labeled, dtype=tf.int64), [reps])[:num_unlabeled]
    perm_l = tf.random.experimental.stateless_shuffle(labeled_rep, augment.fold_seed(base, 2))
    pos = tf.reshape(tf.range(steps * batch, dtype=tf.int64), [steps, batch])
    pos = tf.reshape(pos[:, process_index * local_batch:(process_index + 1) * local_batch], [-1])
    first = tf.where(tf.equal(epoch, start_epoch), start_offset * local_batch, 0)
    pos = pos[first:]
    return {"epoch": tf.fill(tf.shape(pos), epoch), "pos": pos,
            "l": tf.gather(perm_l, pos), "u": tf.gather(perm_u, pos)}


def create_train_dataset(config, *, start_step: int = 0, process_index: int | None = None,
                         process_count: int | None = None) -> tf.data.Dataset:
    """The infinite tf.data pipeline behind create_train_iterator (batched, this process's share)."""
    process_index, process_count = _processes(process_index, process_count)
    plan = _train_plan(config)
    batch, local_batch = _global_batch(config, process_count)
    steps = _steps(len(plan.split.unlabeled), batch, plan.split.unlabeled_source)
    if start_step < 0:
        raise DataError(f"start_step={start_step}; expected >= 0.")
    start_epoch, start_offset = divmod(int(start_step), steps)
    crop = int(_opt(config, "crop_size"))
    student = _opt(config, "student_view")
    if student not in ("weak", "strong"):
        raise DataError(f"data.student_view={student!r}; expected 'weak' (release) or 'strong'.")
    cutmix_prob = float(_opt(config, "cutmix_prob"))
    if not 0.0 <= cutmix_prob <= 1.0:
        raise DataError(f"data.cutmix_prob={cutmix_prob}; expected a probability in [0, 1].")
    labeled_strong = bool(_opt(config, "labeled_strong"))
    scale_range = tuple(float(x) for x in _opt(config, "scale_range"))
    seed = int(_get(config, "seed", 0) or 0)
    num_classes = plan.num_classes
    lr, ur = plan.labeled_reader, plan.unlabeled_reader
    parallel = int(_opt(config, "num_parallel_calls"))
    parallel = tf.data.AUTOTUNE if parallel < 0 else parallel

    def epoch_ds(epoch):
        return tf.data.Dataset.from_tensor_slices(_epoch_positions(
            epoch, seed=seed, num_labeled=len(plan.split.labeled),
            num_unlabeled=len(plan.split.unlabeled), steps=steps, batch=batch, local_batch=local_batch,
            process_index=process_index, start_epoch=start_epoch, start_offset=start_offset))

    def load(el):
        step_seed = augment.fold_seed(tf.constant([seed, _SEED_SALT], tf.int64), el["epoch"] + 1,
                                      el["pos"])
        image_b, image_path = lr.image(el["l"])
        mask_b, mask_path = lr.mask(el["l"])
        image = augment.decode_image(image_b, image_path)
        mask = augment.decode_mask(mask_b, mask_path, num_classes)
        image = augment.check_same_size(image, mask, image_path, mask_path)
        image_l, mask_l = augment.augment_labeled(image, mask, crop, augment.fold_seed(step_seed, 0),
                                                  labeled_strong, scale_range)
        u_b, u_path = ur.image(el["u"])
        u = augment.decode_image(u_b, u_path)
        out = augment.augment_unlabeled(u, crop, augment.fold_seed(step_seed, 1), student == "strong",
                                        cutmix_prob, scale_range)
        out.update(image_l=image_l, mask_l=mask_l)
        return out

    ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch_ds)
    ds = ds.map(load, num_parallel_calls=parallel, deterministic=True)
    ds = ds.batch(local_batch, drop_remainder=True)
    ds = ds.prefetch(int(_opt(config, "prefetch")))
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_optimization.map_parallelization = True
    return ds.with_options(options)


def _clean_message(message: str) -> str:
    """The readable part of a tf.data error: our assertion's text, or TF's first line."""
    if "assertion failed:" in message:
        text = message.split("assertion failed:", 1)[1].split("\n")[0]
        parts = re.findall(r"\[(.*?)\](?= \[|$)", text.strip())
        return " ".join(p.strip() for p in parts) if parts else text.strip()
    return message.strip().split("\n")[0]


def _numpy_iterator(ds: tf.data.Dataset, what: str) -> Iterator[dict[str, np.ndarray]]:
    it = iter(ds)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except tf.errors.OpError as e:
            raise DataError(f"{what}: {_clean_message(e.message)}") from None
        yield {k: v.numpy() for k, v in batch.items()}


def create_train_iterator(config, *, start_step: int = 0, process_index: int | None = None,
                          process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """This process's share of every global training batch from `start_step` on (infinite).

    Yields dicts (b = data.batch_size // process_count, S = data.crop_size):
      image_l (b, S, S, 3) float32 normalised; mask_l (b, S, S) int32 (255 ignore);
      image_u_w (b, S, S, 3) float32 teacher view; image_u_s (b, S, S, 3) float32 student view;
      pad_u (b, S, S) bool, True on padding; cutmix_u (b, S, S) bool CutMix box (all False when off).
    Bad inputs raise DataError (eagerly for options and lists, on the failing batch for file contents).
    """
    ds = create_train_dataset(config, start_step=start_step, process_index=process_index,
                              process_count=process_count)
    return _numpy_iterator(ds, "training input pipeline")


# -------------------------------------------------------------------------------------- validation


def create_val_dataset(config, *, process_index: int | None = None,
                       process_count: int | None = None) -> tf.data.Dataset:
    """This process's share (list positions p, p + P, ...) of the validation set, one image per element.

    Elements: image (H, W, 3) float32 normalised; mask (H, W) int32 (255 ignore); index int64 (the
    position in the val list, to merge results across processes); name string (the image file stem).
    """
    process_index, process_count = _processes(process_index, process_count)
    name = _required(config, "name")
    datasets.layout(name)
    source = _source_kind(config)
    root = _opt(config, "root")
    if source == "files" or (root and name == "synthetic"):
        root = datasets.check_root(root)
    pairs, list_source = splits_lib.resolve_val_split(name, _opt(config, "val_split"), root)
    if source == "files":
        if _opt(config, "check_files"):
            datasets.check_files_exist(root, pairs, list_source, require_masks=True)
        reader = _FileReader(root, pairs)
        num_classes = _num_classes(config)
    else:
        meta = _open_tfds(config)
        reader = meta.reader("val", pairs, list_source)
        num_classes = _num_classes(config, meta)
    names = tf.constant([os.path.splitext(os.path.basename(p[0]))[0] for p in pairs])

    def load(i):
        image_b, image_path = reader.image(i)
        mask_b, mask_path = reader.mask(i)
        image = augment.decode_image(image_b, image_path)
        mask = augment.decode_mask(mask_b, mask_path, num_classes)
        image = augment.check_same_size(image, mask, image_path, mask_path)
        return {"image": augment.normalize(tf.cast(image, tf.float32) / 255.0),
                "mask": tf.cast(mask, tf.int32), "index": i, "name": tf.gather(names, i)}

    parallel = int(_opt(config, "num_parallel_calls"))
    ds = tf.data.Dataset.range(process_index, len(pairs), process_count)
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE if parallel < 0 else parallel,
                deterministic=True)
    return ds.prefetch(int(_opt(config, "prefetch")))


# ------------------------------------------------------------------------------------------ device


def prefetch_to_device(iterator, sharding, size: int = 2):
    """Turns host batches into global jax.Arrays with `sharding`, keeping `size` batches in flight.

    Args:
      iterator: yields pytrees of numpy arrays, this process's share of the global batch (leading axis).
      sharding: a jax.sharding.Sharding for every leaf, or a pytree of them matching the batches.
      size: number of batches transferred ahead.
    Yields:
      the same pytrees of global jax.Arrays (jax.make_array_from_process_local_data).
    """
    import jax  # pylint: disable=g-import-not-at-top

    if isinstance(sharding, jax.sharding.Sharding):
        put = lambda b: jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), b)
    else:
        put = lambda b: jax.tree.map(jax.make_array_from_process_local_data, sharding, b)
    queue = collections.deque()
    iterator = iter(iterator)

    def enqueue(n):
        for b in itertools.islice(iterator, n):
            queue.append(put(b))

    enqueue(max(size, 1))
    while queue:
        yield queue.popleft()
        enqueue(1)
