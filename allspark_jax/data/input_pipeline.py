"""The training and validation input pipelines (tf.data on the host, numpy out, jax arrays on device).

Every function takes the run's `DataOptions` (`allspark_jax.config.data_options`: the `data.*` keys
of configs/default.py, resolved once). The training list resolution (`train_plan`: split lists,
readers, steps per epoch) is done once per run and passed to `create_train_iterator`.

Epochs (release semantics): an epoch walks the unlabeled list once in a fresh random order; the labeled
list is repeated `ceil(U / L)` times, truncated to U and permuted afresh each epoch; step t of epoch e
pairs positions [t B, (t + 1) B) of both orders (B = global batch); the last partial batch is dropped,
so steps_per_epoch = U // B. With a labeled-only method (`Method.labeled_only`: 'supervised', the release's
train_baseline_sup.py) an epoch walks the labeled list once in a fresh random order, steps_per_epoch
= L // B, and batches hold the labeled entries only. Process p of P takes positions
[t B + p b, t B + (p + 1) b), b = B / P, of every global batch. Every example's augmentation is seeded by (seed, epoch, position), so batches
depend neither on P nor on the source ('files' and 'tfds' give identical batches) and a run started
at `start_step` sees exactly the batches an uninterrupted run would (skipping costs no decoding).

Bad file contents raise DataError naming the file and the fault: the iterators (`create_train_iterator`,
`create_val_iterator`) catch a failing element and read its examples again one by one (only then, so
the hot path stays pure tf.data); `data.check_files='decode'` decodes every listed file up front.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import math
import os
import re
import threading
from typing import Any, Iterator

import numpy as np

from allspark_jax.data import augment
from allspark_jax.data import datasets
from allspark_jax.errors import DataError
from allspark_jax.data import splits as splits_lib
from allspark_jax.data.host_tensorflow import tf


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

    def example(self, i):
        """(image bytes, image path, mask bytes, mask path) of labeled example i."""
        return (*self.image(i), *self.mask(i))


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

    def example(self, i):
        """(image bytes, image path, mask bytes, mask path) of labeled example i, both fields from
        one record read (each py_function call is a separate, serialised read)."""
        def fetch(r):
            with self._lock:
                record = self._source[int(r)]
            return record["image"], record["mask"]
        record = tf.gather(self.records, i)
        image_b, mask_b = tf.py_function(fetch, [record], [tf.string, tf.string])
        image_b.set_shape([])
        mask_b.set_shape([])
        return image_b, tf.gather(self.image_paths, i), mask_b, tf.gather(self.mask_paths, i)


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


# ------------------------------------------------------------------------- decoding and file checks


def _decode_mask(mask_b, mask_path, opts):
    """A mask's bytes as (H, W) uint8 labels checked against `opts` (classes, ignore value,
    palette); failures name the file."""
    return augment.decode_mask(mask_b, mask_path, opts.num_classes, opts.ignore_index, opts.palette,
                               opts.max_image_pixels)


def _decode_example(reader, i, opts, labeled: bool):
    """Example i of a list as every pipeline decodes it; failures name the file.

    Returns (image (H, W, 3) uint8, mask (H, W) uint8 with labels checked and the size checked
    against the image) when `labeled`, else (image, None).
    """
    if not labeled:
        return augment.decode_image(*reader.image(i), opts.max_image_pixels), None
    image_b, image_path, mask_b, mask_path = reader.example(i)
    image = augment.decode_image(image_b, image_path, opts.max_image_pixels)
    mask = _decode_mask(mask_b, mask_path, opts)
    return augment.check_same_size(image, mask, image_path, mask_path), mask


def _clean_message(message: str) -> str:
    """The readable part of a TF error: our assertion's text, or the failing op's own reason."""
    if "assertion failed:" in message:
        text = message.split("assertion failed:", 1)[1].split("\n")[0]
        parts = re.findall(r"\[(.*?)\](?= \[|$)", text.strip())
        return " ".join(p.strip() for p in parts) if parts else text.strip()
    line = re.sub(r"^\{\{.*?\}\}\s*", "", message.strip().split("\n")[0])
    if "Iterator::" in line:  # "... with iterator: Iterator::Root::ParallelMapV2: <reason>"
        line = line.rsplit("Iterator::", 1)[1].split(": ", 1)[-1]
    return re.sub(r"\s*\[Op:[^\]]*\].*$", "", line).strip()


# A TF error whose message holds bytes that are not UTF-8 (a decoder quoting the corrupt file, e.g. a
# PNG chunk name) reaches Python as a UnicodeDecodeError over those bytes instead of an OpError.
_TF_ERRORS = (tf.errors.OpError, UnicodeDecodeError)


def _tf_error_message(e: Exception) -> str:
    if isinstance(e, UnicodeDecodeError):
        return bytes(e.object).decode("utf-8", "replace")
    return e.message


def _error_of(fn, i: int) -> str | None:
    """The TF error message of the traced fn(i), or None when it runs."""
    try:
        fn(tf.constant(int(i), tf.int64))
    except _TF_ERRORS as e:
        return _tf_error_message(e)
    return None


def _example_errors(reader, indices, opts, labeled: bool) -> list[str]:
    """What is wrong with each example of `indices` (of one list) that cannot be read, naming the file.

    A bad example's image, mask and pair are tried one after the other, so the message names the
    failing file even when the decoder's own error (`jpeg::Uncompress failed`) does not. Each step is
    traced once for all `indices`.
    """
    steps = [("image", "an intact JPEG or PNG file", reader.image_paths,
              tf.function(lambda i: tf.shape(_decode_example(reader, i, opts, False)[0])))]
    if labeled:
        steps += [("mask", "an intact PNG file", reader.mask_paths,
                   tf.function(lambda i: tf.shape(_decode_mask(*reader.mask(i), opts)))),
                  ("", "", None,
                   tf.function(lambda i: tf.shape(_decode_example(reader, i, opts, True)[0])))]
    errors = []
    for i in indices:
        if _error_of(steps[-1][-1], i) is None:  # the whole example reads
            continue
        for what, expected, paths, fn in steps:
            message = _error_of(fn, i)
            if message is None:
                continue
            if not what or "assertion failed:" in message:  # our own checks name the files
                errors.append(_clean_message(message))
            else:
                path = paths[int(i)].numpy().decode()
                errors.append(f"cannot read {what} {path!r} ({_clean_message(message).rstrip('.')}); "
                              f"expected {expected}")
            break
    return errors


def _check_decodes(lists, opts, parallel: int, progress: bool) -> None:
    """Decodes every example of `lists` ((reader, size, labeled) each) as the pipelines decode them.

    Raises one DataError naming every bad file (and what is wrong with it). The examples are decoded
    by a parallel tf.data pipeline that drops failing ones; only those are then tried one by one.
    """
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    errors = []
    with tqdm(total=sum(n for _, n, _ in lists), desc="checking data files", unit="img",
              disable=not progress, dynamic_ncols=True, leave=False) as bar:
        for reader, n, labeled in lists:
            def check(i, reader=reader, labeled=labeled):
                image, _ = _decode_example(reader, i, opts, labeled)
                return i, tf.shape(image)
            ds = tf.data.Dataset.range(n).map(check, num_parallel_calls=parallel, deterministic=False)
            decoded = np.zeros(n, bool)
            for i, _ in ds.ignore_errors().as_numpy_iterator():
                decoded[i] = True
                bar.update()
            bad = np.flatnonzero(~decoded)
            errors += _example_errors(reader, bad, opts, labeled)
            bar.update(len(bad))
    errors = list(dict.fromkeys(errors))  # an image in two lists is named once
    if errors:
        raise DataError(f"{len(errors)} bad data file(s) (data.check_files='decode'):\n  "
                        + "\n  ".join(errors))


def _val_reader(opts):
    """(val pairs, the list's source, their reader); with data.check_files != 'none', checks that the
    listed files exist (source 'files')."""
    pairs, list_source = splits_lib.resolve_val_split(opts.name, opts.val_split, opts.root)
    if opts.source == "tfds":
        return pairs, list_source, _open_tfds(opts).reader("val", pairs, list_source)
    if opts.check_files != "none":
        datasets.check_files_exist(opts.root, pairs, list_source, require_masks=True)
    return pairs, list_source, _FileReader(opts.root, pairs)


def _parallel(opts) -> int:
    return tf.data.AUTOTUNE if opts.num_parallel_calls < 0 else opts.num_parallel_calls


def check_val_files(opts, *, progress: bool = False) -> None:
    """With data.check_files='decode', decodes every image and mask of the validation list (labels
    in range, sizes equal); one DataError names every bad file. Other levels: nothing to do here
    (every validation dataset checks that its files exist)."""
    if opts.check_files == "decode":
        pairs, _, reader = _val_reader(opts)
        _check_decodes([(reader, len(pairs), True)], opts, _parallel(opts), progress)


# ------------------------------------------------------------------------------------------- train


@dataclasses.dataclass(frozen=True)
class TrainPlan:
    """The resolved training lists of a run (computed once by `train_plan`).

    split: the labeled and unlabeled (image, mask) lists and where they came from; labeled_reader /
    unlabeled_reader: read example i of each list (files or TFDS records; no unlabeled list nor
    reader with `labeled_only`); steps_per_epoch:
    unlabeled images // global batch (labeled images with `labeled_only`; the release drops the
    last partial batch).
    """
    split: splits_lib.TrainSplit
    labeled_reader: Any
    unlabeled_reader: Any
    steps_per_epoch: int


def train_plan(opts, *, progress: bool = False) -> TrainPlan:
    """Resolves the split lists of `opts` and checks their files at `data.check_files`.

    'exist': every listed file is present (source 'files'). 'decode': besides, every image and mask
    of the labeled, unlabeled and validation lists is decoded as the pipelines decode it (labels in
    range, sizes equal), with a progress bar if `progress`; one DataError names every bad file.
    """
    tfds_meta = _open_tfds(opts) if opts.source == "tfds" else None
    root = opts.root
    if opts.method.labeled_only:  # no unlabeled list is read
        split = splits_lib.resolve_train_split(opts.name, opts.split, root=root, labeled_only=True)
    elif tfds_meta is not None and opts.name == "coco" and not opts.unlabeled_split and not root:
        split = splits_lib.resolve_train_split(opts.name, opts.split, root=None, unlabeled_split=None,
                                               coco_train_images=tfds_meta.paths("train"))
    else:
        split = splits_lib.resolve_train_split(opts.name, opts.split, opts.unlabeled_split, root)
    walked, source = ((split.labeled, split.labeled_source) if opts.method.labeled_only
                      else (split.unlabeled, split.unlabeled_source))
    steps = len(walked) // opts.batch_size
    if steps == 0:
        kind = "labeled" if opts.method.labeled_only else "unlabeled"
        raise DataError(f"the {kind} list ({source}) "
                        f"has {len(walked)} images, fewer than data.batch_size={opts.batch_size}; "
                        "expected at least one full global batch per epoch.")
    if tfds_meta is None:
        if opts.check_files != "none":
            datasets.check_files_exist(root, split.labeled, split.labeled_source, require_masks=True)
            if not opts.method.labeled_only:
                datasets.check_files_exist(root, split.unlabeled, split.unlabeled_source,
                                           require_masks=False)
        readers = (_FileReader(root, split.labeled),
                   None if opts.method.labeled_only else _FileReader(root, split.unlabeled))
    else:
        readers = (tfds_meta.reader("train", split.labeled, split.labeled_source),
                   None if opts.method.labeled_only
                   else tfds_meta.reader("train", split.unlabeled, split.unlabeled_source))
    if opts.check_files == "decode":
        val_pairs, _, val_reader = _val_reader(opts)
        unlabeled = [] if opts.method.labeled_only else [(readers[1], len(split.unlabeled), False)]
        _check_decodes([(readers[0], len(split.labeled), True), *unlabeled,
                        (val_reader, len(val_pairs), True)], opts, _parallel(opts), progress)
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
    # the labeled list, once, in a fresh order (labeled_only); else as many as the unlabeled list
    walked = num_labeled if labeled_only else num_unlabeled
    reps = math.ceil(walked / num_labeled)
    labeled_rep = tf.tile(tf.range(num_labeled, dtype=tf.int64), [reps])[:walked]
    perm_l = tf.random.experimental.stateless_shuffle(labeled_rep, augment.fold_seed(base, 2))
    pos = tf.reshape(tf.range(steps * batch, dtype=tf.int64), [steps, batch])
    pos = tf.reshape(pos[:, process_index * local_batch:(process_index + 1) * local_batch], [-1])
    first = tf.where(tf.equal(epoch, start_epoch), start_offset * local_batch, 0)
    pos = pos[first:]
    out = {"epoch": tf.fill(tf.shape(pos), epoch), "pos": pos, "l": tf.gather(perm_l, pos)}
    if not labeled_only:
        perm_u = tf.random.experimental.stateless_shuffle(
            tf.range(num_unlabeled, dtype=tf.int64), augment.fold_seed(base, 1))
        out["u"] = tf.gather(perm_u, pos)
    return out


def _positions(opts, plan: TrainPlan, process_index: int, process_count: int, start_step: int):
    """epoch -> that epoch's `_epoch_positions` of this process (the first epoch from `start_step`)."""
    start_epoch, start_offset = divmod(int(start_step), plan.steps_per_epoch)
    return functools.partial(
        _epoch_positions, seed=opts.seed, num_labeled=len(plan.split.labeled),
        num_unlabeled=len(plan.split.unlabeled), steps=plan.steps_per_epoch, batch=opts.batch_size,
        local_batch=_local_batch(opts, process_count), process_index=process_index,
        start_epoch=start_epoch, start_offset=start_offset, labeled_only=opts.method.labeled_only)


def create_train_dataset(opts, *, start_step: int = 0, plan: TrainPlan | None = None,
                         process_index: int | None = None,
                         process_count: int | None = None) -> tf.data.Dataset:
    """The infinite tf.data pipeline behind create_train_iterator (batched, this process's share)."""
    process_index, process_count = _processes(process_index, process_count)
    plan = train_plan(opts) if plan is None else plan
    local_batch = _local_batch(opts, process_count)
    if start_step < 0:
        raise DataError(f"start_step={start_step}; expected >= 0.")
    start_epoch = int(start_step) // plan.steps_per_epoch
    positions = _positions(opts, plan, process_index, process_count, start_step)
    crop, seed = opts.crop_size, opts.seed
    lr, ur = plan.labeled_reader, plan.unlabeled_reader

    def epoch_ds(epoch):
        return tf.data.Dataset.from_tensor_slices(positions(epoch))

    def load(el):
        step_seed = augment.fold_seed(tf.constant([seed, _SEED_SALT], tf.int64), el["epoch"] + 1,
                                      el["pos"])
        image, mask = _decode_example(lr, el["l"], opts, labeled=True)
        image_l, mask_l = augment.augment_labeled(image, mask, crop, augment.fold_seed(step_seed, 0),
                                                  opts.labeled_strong, opts.scale_range)
        if opts.method.labeled_only:
            return {"image_l": image_l, "mask_l": mask_l}
        u, _ = _decode_example(ur, el["u"], opts, labeled=False)
        out = augment.augment_unlabeled(u, crop, augment.fold_seed(step_seed, 1),
                                        opts.method.student_view == "strong",
                                        opts.method.cutmix_prob,
                                        opts.scale_range, opts.method.strong_views)
        out.update(image_l=image_l, mask_l=mask_l)
        return out

    ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch_ds)
    ds = ds.map(load, num_parallel_calls=_parallel(opts), deterministic=True)
    ds = ds.batch(local_batch, drop_remainder=True)
    ds = ds.prefetch(opts.prefetch)
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_optimization.map_parallelization = True
    return ds.with_options(options)


def _numpy_iterator(ds: tf.data.Dataset, what: str, culprits) -> Iterator[dict[str, np.ndarray]]:
    """`ds` as numpy dicts; an error raises DataError naming the bad files.

    tf.data errors surface in element order (deterministic pipelines), so the failure belongs to
    element n (the count yielded so far): `culprits(n)` reads that element's examples again one by
    one (`_example_errors`) and returns what is wrong with the bad ones (empty if none fails alone).
    """
    it = iter(ds)
    for n in itertools.count():
        try:
            batch = next(it)
        except StopIteration:
            return
        except _TF_ERRORS as e:
            errors = culprits(n) or [_clean_message(_tf_error_message(e))]
            raise DataError(f"{what}: {'; '.join(errors)}") from None
        yield {k: v.numpy() for k, v in batch.items()}


def create_train_iterator(opts, *, start_step: int = 0, plan: TrainPlan | None = None,
                          process_index: int | None = None,
                          process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """This process's share of every global training batch from `start_step` on (infinite).

    Yields dicts (b = data.batch_size // process_count, S = data.crop_size):
      image_l (b, S, S, 3) float32 normalised; mask_l (b, S, S) int32 (255 ignore);
      image_u_w (b, S, S, 3) float32 teacher view; image_u_s (b, S, S, 3) float32 student view;
      pad_u (b, S, S) bool, True on padding; cutmix_u (b, S, S) bool CutMix box (all False when off);
      with `opts.method.labeled_only` only image_l and mask_l; with `opts.method.strong_views` == 2
      (UniMatch V2's recipe) image_l, mask_l, image_u_w, pad_u and, for each strong view k = 1, 2
      (one geometry with the weak view, its own photometric draw and box), image_u_s{k}
      (b, S, S, 3) float32 and cutmix_u{k} (b, S, S) bool (all False when off).
    `train_step.batch_keys(method)` names the entries a step reads (the boxes only with CutMix on).
    Bad inputs raise DataError (eagerly for options and lists, on the failing batch for file contents,
    naming the step and every bad file of its batch).
    """
    process_index, process_count = _processes(process_index, process_count)
    plan = train_plan(opts) if plan is None else plan
    ds = create_train_dataset(opts, start_step=start_step, plan=plan, process_index=process_index,
                              process_count=process_count)
    positions = _positions(opts, plan, process_index, process_count, 0)
    local_batch = _local_batch(opts, process_count)

    def culprits(n):
        epoch, offset = divmod(start_step + n, plan.steps_per_epoch)
        batch = slice(offset * local_batch, (offset + 1) * local_batch)
        el = positions(epoch)
        errors = _example_errors(plan.labeled_reader, np.unique(el["l"][batch].numpy()),
                                 opts, True)
        if "u" in el:
            errors += _example_errors(plan.unlabeled_reader, np.unique(el["u"][batch].numpy()),
                                      opts, False)
        return [f"step {start_step + n}: {e}" for e in errors]

    return _numpy_iterator(ds, "training input pipeline", culprits)


# -------------------------------------------------------------------------------------- validation


def _val_dataset(opts, process_index: int, process_count: int):
    """(create_val_dataset's dataset, the val list's reader)."""
    pairs, _, reader = _val_reader(opts)
    names = tf.constant([os.path.splitext(os.path.basename(p[0]))[0] for p in pairs])

    def load(i):
        image, mask = _decode_example(reader, i, opts, labeled=True)
        return {"image": augment.normalize(tf.cast(image, tf.float32) / 255.0),
                "mask": tf.cast(mask, tf.int32), "index": i, "name": tf.gather(names, i)}

    ds = tf.data.Dataset.range(process_index, len(pairs), process_count)
    ds = ds.map(load, num_parallel_calls=_parallel(opts), deterministic=True)
    return ds.prefetch(opts.prefetch), reader


def create_val_dataset(opts, *, process_index: int | None = None,
                       process_count: int | None = None) -> tf.data.Dataset:
    """This process's share (list positions p, p + P, ...) of the validation set, one image per element.

    Elements: image (H, W, 3) float32 normalised; mask (H, W) int32 (255 ignore); index int64 (the
    position in the val list, to merge results across processes); name string (the image file stem).
    A bad file fails with TensorFlow's error at iteration; `create_val_iterator` names the file.
    """
    return _val_dataset(opts, *_processes(process_index, process_count))[0]


def create_val_iterator(opts, *, process_index: int | None = None, process_count: int | None = None,
                        max_images: int = -1) -> tuple[Iterator[dict[str, np.ndarray]], int]:
    """create_val_dataset's elements as numpy dicts, and how many this process gets.

    max_images > 0: only list positions below it. A bad file raises DataError naming it and the fault.
    """
    process_index, process_count = _processes(process_index, process_count)
    ds, reader = _val_dataset(opts, process_index, process_count)
    count = int(ds.cardinality())
    if max_images > 0:
        count = min(count, len(range(process_index, max_images, process_count)))
        ds = ds.take(count)

    def culprits(n):
        return _example_errors(reader, [process_index + n * process_count], opts, True)

    return _numpy_iterator(ds, "validation input pipeline", culprits), count


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
