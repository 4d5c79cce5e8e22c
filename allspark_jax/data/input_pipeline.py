"""The training and validation input pipelines (tf.data on the host, numpy out, jax arrays on device).

Every function takes the run's `DataOptions` (`allspark_jax.config.data_options`: the `data.*` keys
of configs/default.py, resolved once). The training list resolution (`train_plan`: split lists,
readers, steps per epoch) is done once per run and passed to `create_train_iterator`.

Epochs (release semantics): an epoch walks the unlabeled list once in a fresh random order; the labeled
list is repeated `ceil(U / L)` times, truncated to U and permuted afresh each epoch; step t of epoch e
pairs positions [t B, (t + 1) B) of both orders (B = global batch); the last partial batch is dropped,
so steps_per_epoch = U // B. With `labeled_only` (config.method 'supervised', the release's
train_baseline_sup.py) an epoch walks the labeled list once in a fresh random order, steps_per_epoch
= L // B, and batches hold the labeled entries only. Process p of P takes positions
[t B + p b, t B + (p + 1) b), b = B / P, of every global batch. Every example's augmentation is seeded by (seed, epoch, position), so batches
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

_SEED_SALT = 0x5EED  # second word of the base seed


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


def _open_tfds(opts) -> _Tfds:
    from allspark_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top
    b = tfds_builders.open_prepared(opts.name, opts.tfds_data_dir)
    return _Tfds(b, os.fspath(b.data_dir))


# ------------------------------------------------------------------------------------------- train


@dataclasses.dataclass(frozen=True)
class TrainPlan:
    """The resolved training lists of a run (computed once by `train_plan`).

    split: the labeled and unlabeled (image, mask) lists and where they came from; labeled_reader /
    unlabeled_reader: read example i of each list (files or TFDS records); steps_per_epoch:
    unlabeled images // global batch (labeled images with `labeled_only`; the release drops the
    last partial batch).
    """
    split: splits_lib.TrainSplit
    labeled_reader: Any
    unlabeled_reader: Any
    steps_per_epoch: int


def train_plan(opts) -> TrainPlan:
    """Resolves the split lists of `opts` (and checks the listed files exist, `data.check_files`)."""
    tfds_meta = _open_tfds(opts) if opts.source == "tfds" else None
    root = opts.root
    if tfds_meta is not None and opts.name == "coco" and not opts.unlabeled_split and not root:
        split = splits_lib.resolve_train_split(opts.name, opts.split, root=None, unlabeled_split=None,
                                               coco_train_images=tfds_meta.paths("train"))
    else:
        split = splits_lib.resolve_train_split(opts.name, opts.split, opts.unlabeled_split, root)
    walked, source = ((split.labeled, split.labeled_source) if opts.labeled_only
                      else (split.unlabeled, split.unlabeled_source))
    steps = len(walked) // opts.batch_size
    if steps == 0:
        raise DataError(f"the {'labeled' if opts.labeled_only else 'unlabeled'} list ({source}) "
                        f"has {len(walked)} images, fewer than data.batch_size={opts.batch_size}; "
                        "expected at least one full global batch per epoch.")
    if tfds_meta is None:
        if opts.check_files:
            datasets.check_files_exist(root, split.labeled, split.labeled_source, require_masks=True)
            if not opts.labeled_only:
                datasets.check_files_exist(root, split.unlabeled, split.unlabeled_source,
                                           require_masks=False)
        readers = _FileReader(root, split.labeled), _FileReader(root, split.unlabeled)
    else:
        readers = (tfds_meta.reader("train", split.labeled, split.labeled_source),
                   tfds_meta.reader("train", split.unlabeled, split.unlabeled_source))
    return TrainPlan(split, *readers, steps)


def _local_batch(opts, process_count: int) -> int:
    if opts.batch_size % process_count:
        raise DataError(f"data.batch_size={opts.batch_size} (global) is not a positive multiple of "
                        f"the process count {process_count}.")
    return opts.batch_size // process_count


def _epoch_positions(epoch, *, seed: int, num_labeled: int, num_unlabeled: int, steps: int,
                     batch: int, local_batch: int, process_index: int, start_epoch: int,
                     start_offset: int, labeled_only: bool = False) -> dict[str, tf.Tensor]:
    """One epoch's (epoch, position, labeled index, unlabeled index) of this process, in step order.

    `labeled_only`: the epoch walks the labeled list once; no unlabeled index."""
    epoch = tf.cast(epoch, tf.int64)
    base = augment.fold_seed(tf.constant([seed, _SEED_SALT], tf.int64), epoch)
    perm_u = tf.random.experimental.stateless_shuffle(
        tf.range(num_unlabeled, dtype=tf.int64), augment.fold_seed(base, 1))
    if labeled_only:
        num_unlabeled = num_labeled  # the labeled list, once, in a fresh order
    reps = math.ceil(num_unlabeled / num_labeled)
    labeled_rep = tf.tile(tf.range(num_labeled, dtype=tf.int64), [reps])[:num_unlabeled]
    perm_l = tf.random.experimental.stateless_shuffle(labeled_rep, augment.fold_seed(base, 2))
    pos = tf.reshape(tf.range(steps * batch, dtype=tf.int64), [steps, batch])
    pos = tf.reshape(pos[:, process_index * local_batch:(process_index + 1) * local_batch], [-1])
    first = tf.where(tf.equal(epoch, start_epoch), start_offset * local_batch, 0)
    pos = pos[first:]
    out = {"epoch": tf.fill(tf.shape(pos), epoch), "pos": pos, "l": tf.gather(perm_l, pos)}
    if not labeled_only:
        out["u"] = tf.gather(perm_u, pos)
    return out


def create_train_dataset(opts, *, start_step: int = 0, plan: TrainPlan | None = None,
                         process_index: int | None = None,
                         process_count: int | None = None) -> tf.data.Dataset:
    """The infinite tf.data pipeline behind create_train_iterator (batched, this process's share)."""
    process_index, process_count = _processes(process_index, process_count)
    plan = train_plan(opts) if plan is None else plan
    batch, local_batch = opts.batch_size, _local_batch(opts, process_count)
    steps = plan.steps_per_epoch
    if start_step < 0:
        raise DataError(f"start_step={start_step}; expected >= 0.")
    start_epoch, start_offset = divmod(int(start_step), steps)
    crop, seed, num_classes = opts.crop_size, opts.seed, opts.num_classes
    lr, ur = plan.labeled_reader, plan.unlabeled_reader
    parallel = tf.data.AUTOTUNE if opts.num_parallel_calls < 0 else opts.num_parallel_calls

    def epoch_ds(epoch):
        return tf.data.Dataset.from_tensor_slices(_epoch_positions(
            epoch, seed=seed, num_labeled=len(plan.split.labeled),
            num_unlabeled=len(plan.split.unlabeled), steps=steps, batch=batch, local_batch=local_batch,
            process_index=process_index, start_epoch=start_epoch, start_offset=start_offset,
            labeled_only=opts.labeled_only))

    def load(el):
        step_seed = augment.fold_seed(tf.constant([seed, _SEED_SALT], tf.int64), el["epoch"] + 1,
                                      el["pos"])
        image_b, image_path = lr.image(el["l"])
        mask_b, mask_path = lr.mask(el["l"])
        image = augment.decode_image(image_b, image_path)
        mask = augment.decode_mask(mask_b, mask_path, num_classes)
        image = augment.check_same_size(image, mask, image_path, mask_path)
        image_l, mask_l = augment.augment_labeled(image, mask, crop, augment.fold_seed(step_seed, 0),
                                                  opts.labeled_strong, opts.scale_range)
        if opts.labeled_only:
            return {"image_l": image_l, "mask_l": mask_l}
        u_b, u_path = ur.image(el["u"])
        u = augment.decode_image(u_b, u_path)
        out = augment.augment_unlabeled(u, crop, augment.fold_seed(step_seed, 1),
                                        opts.student_view == "strong", opts.cutmix_prob,
                                        opts.scale_range)
        out.update(image_l=image_l, mask_l=mask_l)
        return out

    ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch_ds)
    ds = ds.map(load, num_parallel_calls=parallel, deterministic=True)
    ds = ds.batch(local_batch, drop_remainder=True)
    ds = ds.prefetch(opts.prefetch)
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


def create_train_iterator(opts, *, start_step: int = 0, plan: TrainPlan | None = None,
                          process_index: int | None = None,
                          process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """This process's share of every global training batch from `start_step` on (infinite).

    Yields dicts (b = data.batch_size // process_count, S = data.crop_size):
      image_l (b, S, S, 3) float32 normalised; mask_l (b, S, S) int32 (255 ignore);
      image_u_w (b, S, S, 3) float32 teacher view; image_u_s (b, S, S, 3) float32 student view;
      pad_u (b, S, S) bool, True on padding; cutmix_u (b, S, S) bool CutMix box (all False when off);
      with `opts.labeled_only` only image_l and mask_l.
    Bad inputs raise DataError (eagerly for options and lists, on the failing batch for file contents).
    """
    ds = create_train_dataset(opts, start_step=start_step, plan=plan, process_index=process_index,
                              process_count=process_count)
    return _numpy_iterator(ds, "training input pipeline")


# -------------------------------------------------------------------------------------- validation


def create_val_dataset(opts, *, process_index: int | None = None,
                       process_count: int | None = None) -> tf.data.Dataset:
    """This process's share (list positions p, p + P, ...) of the validation set, one image per element.

    Elements: image (H, W, 3) float32 normalised; mask (H, W) int32 (255 ignore); index int64 (the
    position in the val list, to merge results across processes); name string (the image file stem).
    """
    process_index, process_count = _processes(process_index, process_count)
    pairs, list_source = splits_lib.resolve_val_split(opts.name, opts.val_split, opts.root)
    num_classes = opts.num_classes
    if opts.source == "files":
        if opts.check_files:
            datasets.check_files_exist(opts.root, pairs, list_source, require_masks=True)
        reader = _FileReader(opts.root, pairs)
    else:
        reader = _open_tfds(opts).reader("val", pairs, list_source)
    names = tf.constant([os.path.splitext(os.path.basename(p[0]))[0] for p in pairs])

    def load(i):
        image_b, image_path = reader.image(i)
        mask_b, mask_path = reader.mask(i)
        image = augment.decode_image(image_b, image_path)
        mask = augment.decode_mask(mask_b, mask_path, num_classes)
        image = augment.check_same_size(image, mask, image_path, mask_path)
        return {"image": augment.normalize(tf.cast(image, tf.float32) / 255.0),
                "mask": tf.cast(mask, tf.int32), "index": i, "name": tf.gather(names, i)}

    parallel = opts.num_parallel_calls
    ds = tf.data.Dataset.range(process_index, len(pairs), process_count)
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE if parallel < 0 else parallel,
                deterministic=True)
    return ds.prefetch(opts.prefetch)


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
