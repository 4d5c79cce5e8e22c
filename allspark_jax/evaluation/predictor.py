"""The release's evaluation modes through bucketed programs, batched over this process's devices.

Modes (`config.eval.mode`):
  * ``original``       the whole image at its own size;
  * ``center_crop``    the central crop_size x crop_size window (image and mask);
  * ``sliding_window`` windows of crop_size at stride floor(2/3 * crop_size), clipped at the borders,
                       softmax probabilities summed, argmax.
Every image gets the prediction it would get alone at its own size, as in the release's
one-image-per-call evaluation (`bucketing`: padded batches with the true sizes as inputs), so a
whole validation set runs through one compiled program per bucket (`config.eval.buckets`) and batch.
"""
from __future__ import annotations

import collections
import math
from typing import Any, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from allspark_jax.evaluation import bucketing

EVAL_MODES = ("original", "center_crop", "sliding_window")


def eval_crop_size(config) -> int:
    """The window / crop side of center_crop and sliding_window evaluation."""
    return int(config.eval.crop_size or config.data.crop_size)
# An image larger than every bucket gets a bucket of its own size rounded up to this multiple.
OVERSIZE_ROUND = 128

_argmax = jax.jit(lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32))


class Predictor:
    """Predictions of a model with the release's evaluation modes.

    Args:
      model: an `AllSparkSegmentor` (its "eval" mode takes the true sizes of a padded batch).
      mode: one of EVAL_MODES.
      crop_size: the crop / window side of center_crop and sliding_window.
      buckets: bucket sides or (height, width) pairs for whole images (`original`) and for the
        canvas of sliding-window sums; crops and windows use (crop_size, crop_size).
      batch_size: images (or windows) per device in one program call; a call holds
        `batch_size x local devices`, split over this process's devices.
      devices: the devices to run on (default: this process's).
    """

    def __init__(self, model, mode: str = "original", crop_size: int | None = None,
                 buckets: Sequence[int | Sequence[int]] = (512,), batch_size: int = 1,
                 devices=None):
        if mode not in EVAL_MODES:
            raise ValueError(f"config.eval.mode must be one of {EVAL_MODES}, got {mode!r}")
        if mode != "original" and not crop_size:
            raise ValueError(f"eval mode {mode!r} needs a crop size (config.eval.crop_size or "
                             "config.data.crop_size)")
        self.model, self.mode, self.crop = model, mode, crop_size
        self.buckets = bucketing.as_buckets(buckets)
        devices = jax.local_devices() if devices is None else list(devices)
        mesh = Mesh(np.asarray(devices), ("data",))
        self._batch_sharding = NamedSharding(mesh, P("data"))
        self._replicated = NamedSharding(mesh, P())
        self.batch = int(batch_size) * len(devices)
        self.logits_fn = bucketing.make_logits_fn(model)
        self.predict_fn = bucketing.make_predict_fn(model)
        self._oversize_seen = set()

    # ------------------------------------------------------------------------------------ host
    def prepare(self, image, mask=None):
        """Host-side cropping (center_crop); returns (image, mask) as the model will see them."""
        if self.mode == "center_crop":
            return (bucketing.center_crop(image, self.crop),
                    None if mask is None else bucketing.center_crop(mask, self.crop))
        return image, mask

    def bucket_for(self, size: Sequence[int]) -> bucketing.Bucket:
        """The program shape an image of `size` (already prepared) runs in."""
        if self.mode == "center_crop":
            return self.crop, self.crop
        h, w = int(size[0]), int(size[1])
        if any(h <= bh and w <= bw for bh, bw in self.buckets):
            return bucketing.choose_bucket((h, w), self.buckets)
        bucket = (OVERSIZE_ROUND * math.ceil(h / OVERSIZE_ROUND),
                  OVERSIZE_ROUND * math.ceil(w / OVERSIZE_ROUND))
        if bucket not in self._oversize_seen:
            self._oversize_seen.add(bucket)
            logging.warning("an image of %dx%d fits no bucket of config.eval.buckets=%s: it runs "
                            "in a %dx%d program of its own (add a bucket holding it to compile "
                            "fewer programs)", h, w, self.buckets, *bucket)
        return bucket

    def device_variables(self, variables):
        """`variables` (params, batch_stats; the memory for the branch "memory") replicated on
        this predictor's devices."""
        inference = {k: variables[k] for k in bucketing.inference_collections(self.model)
                     if k in variables}
        return jax.device_put(inference, self._replicated)

    # --------------------------------------------------------------------------------- device
    def _run(self, variables, images, bucket):
        batch, sizes = bucketing.pad_batch(images, bucket, self.batch)
        return self.predict_fn(variables, jax.device_put(batch, self._batch_sharding), sizes), sizes

    def _sliding_window(self, variables, image):
        """(H, W) int32 device prediction of one image (its canvas): windows batched over devices."""
        windows, sizes, offsets = bucketing.window_batch(image, self.crop)
        canvas = self.bucket_for(np.shape(image)[:2])
        total = None
        for i in range(0, len(windows), self.batch):
            k = len(windows[i:i + self.batch])
            win = np.zeros((self.batch, *windows.shape[1:]), np.float32)
            size, off = np.zeros((self.batch, 2), np.int32), np.zeros((self.batch, 2), np.int32)
            win[:k], size[:k], off[:k] = (a[i:i + k] for a in (windows, sizes, offsets))
            logits = self.logits_fn(variables, jax.device_put(win, self._batch_sharding), size)
            if total is None:
                total = jax.device_put(np.zeros((*canvas, logits.shape[-1]), np.float32),
                                       self._replicated)
            total = bucketing.accumulate_windows(total, logits, size, off)
        return _argmax(total)

    def predict_stream(self, variables, items: Iterable[tuple[Any, np.ndarray]], *,
                       max_in_flight: int = 2) -> Iterator[tuple[Any, np.ndarray]]:
        """Yields (payload, prediction) for every (payload, image) of `items`, as they finish.

        Images must be `prepare`d; predictions are (h, w) int32 numpy arrays of each image's size.
        Images wait per bucket until a call's batch is full (the rest run at the end), so the
        output order differs from the input order; at most `max_in_flight` calls are dispatched
        and not yet read back.
        """
        variables = self.device_variables(variables)
        pending: dict[bucketing.Bucket, list] = collections.defaultdict(list)
        in_flight: collections.deque = collections.deque()

        def drain(limit):
            while len(in_flight) > limit:
                payloads, preds, sizes = in_flight.popleft()
                preds = np.asarray(preds)
                if sizes is None:  # sliding window: one image
                    yield payloads[0], preds[:payloads[1][0], :payloads[1][1]]
                    continue
                for payload, pred in zip(payloads, bucketing.unpad(preds, sizes)):
                    yield payload, pred

        def launch(bucket):
            group = pending.pop(bucket)
            preds, sizes = self._run(variables, [im for _, im in group], bucket)
            in_flight.append(([p for p, _ in group], preds, sizes))

        for payload, image in items:
            if self.mode == "sliding_window":
                in_flight.append(((payload, np.shape(image)[:2]),
                                  self._sliding_window(variables, image), None))
            else:
                bucket = self.bucket_for(np.shape(image))
                pending[bucket].append((payload, image))
                if len(pending[bucket]) == self.batch:
                    launch(bucket)
            yield from drain(max_in_flight)
        for bucket in list(pending):
            launch(bucket)
        yield from drain(0)

    def predict(self, variables, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Predictions of `images` (each `prepare`d), in order."""
        out = dict(self.predict_stream(variables, enumerate(images)))
        return [out[i] for i in range(len(images))]
