"""Size buckets: images of many sizes through one compiled program per bucket, exactly.

The release evaluates every image alone at its own size; a jitted model compiles once per input
shape, and Pascal VOC / COCO validation images come in hundreds of sizes. Here images are padded
(bottom / right, zeros) to a bucket and batched, and the model receives each image's true size as
an array (`AllSparkSegmentor(..., valid_size=)`): the true part of each image's logits equals
its logits alone at its own size (to float32 round-off), for any size up to the bucket. So one
program per (bucket, batch size) serves a whole validation set.

Layouts: images (H, W, C) float32, normalised; batches (B, H, W, C); sizes (B, 2) int32 (true
height, width; image b is batch[b, :h_b, :w_b]); logits (B, H, W, K) float32, 0 outside the true
sizes; predictions (B, H, W) int32 (meaningful inside the true sizes only: read back with `unpad`).

Evaluation modes through the same programs:
  * ``original``        `choose_bucket` -> `pad_batch` -> `make_logits_fn` / `make_predict_fn`.
  * ``center_crop``     `center_crop` (host) -> `pad_batch(crops, (crop, crop))` -> the same; crops
                        smaller than the crop (an image side below it) are padded, not recompiled.
  * ``sliding_window``  `window_batch` (each clipped window padded to crop x crop, with its true
                        size and offset) -> the bucketed logits -> `accumulate_windows`;
                        `sliding_window_probs` chains them for one image.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Bucket = tuple[int, int]

# The collections "eval" mode reads; dropping the Semantic Memory keeps it off the device and out
# of the program's signature (only the AllSpark branch "memory" reads it: `inference_collections`).
INFERENCE_COLLECTIONS = ("params", "batch_stats")


def inference_collections(model) -> tuple[str, ...]:
    """The variable collections `model`'s "eval" (and "teacher") mode reads."""
    return INFERENCE_COLLECTIONS + (("memory",) if model.branch == "memory" else ())


# --------------------------------------------------------------------------------------- buckets

def as_buckets(buckets: Sequence[int | Sequence[int]]) -> tuple[Bucket, ...]:
    """Bucket sizes -> (height, width) pairs, smallest area first (stable for equal areas).

    An int is a square bucket; a pair is (height, width).
    """
    out = []
    for b in buckets:
        hw = (int(b), int(b)) if np.ndim(b) == 0 else tuple(int(v) for v in b)
        if len(hw) != 2 or min(hw) < 1:
            raise ValueError(f"a bucket is a positive side or a (height, width) pair, got {b!r}")
        out.append(hw)
    if not out:
        raise ValueError("no bucket sizes given")
    return tuple(sorted(out, key=lambda hw: hw[0] * hw[1]))


def choose_bucket(size: Sequence[int], buckets: Sequence[int | Sequence[int]]) -> Bucket:
    """The smallest bucket (by area, then by order) holding an image of `size` = (height, width).

    An image larger than every bucket is an error naming its size and the buckets: falling back to
    its own size would silently bring back one compilation per size, which buckets exist to avoid;
    add a bucket that holds the largest image instead.
    """
    h, w = (int(v) for v in size[:2])
    candidates = as_buckets(buckets)
    for bh, bw in candidates:
        if h <= bh and w <= bw:
            return bh, bw
    raise ValueError(f"an image of {h}x{w} (height x width) fits no bucket of "
                     f"{', '.join(f'{bh}x{bw}' for bh, bw in candidates)}: add a bucket holding it")


def pad_batch(images: Sequence[Any], bucket: Sequence[int], batch_size: int | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Images of different sizes -> one zero-padded batch and their true sizes (host, numpy).

    Args:
      images: (h, w, C) arrays, each at most the bucket.
      bucket: (height, width) of the batch (an int: square).
      batch_size: the batch's B (fixed, so that the last, partial batch of a set compiles nothing
        new); slots past len(images) are empty: zeros with size (0, 0), whose logits are 0.
        Default: len(images).
    Returns:
      batch (B, bh, bw, C) float32, images at the top-left; sizes (B, 2) int32 (height, width).
    """
    bh, bw = as_buckets([bucket])[0]
    n = len(images)
    batch_size = n if batch_size is None else int(batch_size)
    if n == 0 or n > batch_size:
        raise ValueError(f"pad_batch: {n} images for a batch of {batch_size}")
    channels = {np.shape(im)[2] if np.ndim(im) == 3 else None for im in images}
    if len(channels) != 1 or None in channels:
        raise ValueError(f"pad_batch: images must be (h, w, C) with one C, got shapes "
                         f"{[np.shape(im) for im in images]}")
    batch = np.zeros((batch_size, bh, bw, channels.pop()), np.float32)
    sizes = np.zeros((batch_size, 2), np.int32)
    for i, im in enumerate(images):
        h, w = np.shape(im)[:2]
        if h > bh or w > bw:
            raise ValueError(f"pad_batch: image {i} of {h}x{w} does not fit the {bh}x{bw} bucket")
        batch[i, :h, :w] = np.asarray(im, np.float32)
        sizes[i] = h, w
    return batch, sizes


def unpad(outputs: Any, sizes: Any) -> list[np.ndarray]:
    """Host read-back: (B, H, W, ...) batch outputs -> [outputs[b, :h_b, :w_b]] for every slot."""
    outputs, sizes = np.asarray(outputs), np.asarray(sizes)
    return [outputs[b, :h, :w] for b, (h, w) in enumerate(sizes)]


# -------------------------------------------------------------------------------- the programs

def _logits(model, variables, images, sizes):
    """(B, H, W, C), (B, 2) -> (B, H, W, K) float32, each image as if alone at its own size."""
    return model.apply(variables, images, mode="eval", valid_size=sizes)


def _predict(model, variables, images, sizes):
    return jnp.argmax(_logits(model, variables, images, sizes), axis=-1).astype(jnp.int32)


# The model is static: equal models share programs. One compilation per (model, batch shape, dtype
# of the variables); the sizes are traced int32 arrays (`_checked` fixes their dtype).
_logits_jit = jax.jit(_logits, static_argnums=0)
_predict_jit = jax.jit(_predict, static_argnums=0)


def compiled_programs() -> int:
    """How many bucketed model programs (logits and argmax) this process has compiled."""
    return _logits_jit._cache_size() + _predict_jit._cache_size()


def _checked(model, variables, images, sizes):
    """Validates a batch on the host; returns the arguments of the jitted programs."""
    if not isinstance(images, jax.Array):
        images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be a (B, H, W, C) batch, got shape {images.shape}")
    sizes = np.asarray(sizes)
    b, h, w = images.shape[:3]
    if sizes.shape != (b, 2) or sizes.dtype.kind not in "iu":
        raise ValueError(f"sizes must be ({b}, 2) integers (height, width) for a batch of {b}, "
                         f"got {sizes.shape} {sizes.dtype}")
    bad = np.flatnonzero((sizes < 0).any(1) | (sizes[:, 0] > h) | (sizes[:, 1] > w))
    if bad.size:
        raise ValueError(f"sizes {sizes[bad].tolist()} (images {bad.tolist()}) do not fit the "
                         f"{h}x{w} batch")
    variables = {k: variables[k] for k in inference_collections(model) if k in variables}
    return variables, images, sizes.astype(np.int32)


def make_logits_fn(model) -> Callable[[Any, Any, Any], jax.Array]:
    """`logits_fn(variables, images, sizes)` -> (B, H, W, K) float32 device array.

    images (B, H, W, C) float32 padded batch (`pad_batch`), sizes (B, 2) int true sizes (host
    array: checked against the batch). Jitted; one compilation per (H, W, B).
    """
    return lambda variables, images, sizes: _logits_jit(
        model, *_checked(model, variables, images, sizes))


def make_predict_fn(model) -> Callable[[Any, Any, Any], jax.Array]:
    """`predict_fn(variables, images, sizes)` -> (B, H, W) int32 argmax over classes (device).

    As `make_logits_fn`; only the top-left true part of each prediction is meaningful (`unpad`).
    """
    return lambda variables, images, sizes: _predict_jit(
        model, *_checked(model, variables, images, sizes))


# ----------------------------------------------------------------------------- center crop

def center_crop(array: Any, crop: int) -> Any:
    """The release's center crop of an image (h, w, C) or mask (h, w).

    `x[s:s + crop]` with s = (size - crop) // 2 per axis, plain Python slicing quirks included: an
    axis shorter than `crop` gives a negative start, which slices from the end (e.g. size 400,
    crop 513: rows 343..399, the last 57).
    """
    h, w = np.shape(array)[:2]
    sh, sw = (h - crop) // 2, (w - crop) // 2
    return array[sh:sh + crop, sw:sw + crop]


# ---------------------------------------------------------------------------- sliding window

def window_starts(size: int, crop: int) -> list[int]:
    """The release's window offsets along one axis: 0, s, 2s, ... while < size, s = int(2/3 crop).

    Windows are clipped at the border, not shifted back: the last ones can be smaller than `crop`.
    """
    stride = int(crop * 2 / 3)
    if stride < 1:
        raise ValueError(f"sliding_window: crop size {crop} gives a zero stride")
    return list(range(0, size, stride))


def num_windows(size: Sequence[int], crop: int) -> int:
    """Window count of an image of `size` (height, width); a bucket's is the most of any image it
    holds (use it as `window_batch`'s `num_windows` for one window-batch shape per bucket)."""
    return len(window_starts(int(size[0]), crop)) * len(window_starts(int(size[1]), crop))


def window_batch(image: Any, crop: int, num_windows: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The release's sliding windows of one image as one padded batch (host, numpy).

    Windows in row-major order of their offsets (`window_starts` per axis), each the clipped
    `image[r:min(h, r + crop), c:min(w, c + crop)]` padded to crop x crop.
    Args:
      image: (h, w, C).
      num_windows: pad the batch to this many windows with empty ones (zeros, size (0, 0), offset
        (0, 0): they add nothing); default: the image's own count.
    Returns:
      windows (N, crop, crop, C) float32; sizes (N, 2) int32 true (height, width); offsets (N, 2)
      int32 (row, column) of each window in the image.
    """
    image = np.asarray(image, np.float32)
    h, w, c = image.shape
    boxes = [(r, q) for r in window_starts(h, crop) for q in window_starts(w, crop)]
    n = len(boxes) if num_windows is None else int(num_windows)
    if n < len(boxes):
        raise ValueError(f"an image of {h}x{w} has {len(boxes)} windows of {crop}, more than "
                         f"num_windows={n}")
    windows = np.zeros((n, crop, crop, c), np.float32)
    sizes = np.zeros((n, 2), np.int32)
    offsets = np.zeros((n, 2), np.int32)
    for i, (r, q) in enumerate(boxes):
        win = image[r:r + crop, q:q + crop]
        windows[i, :win.shape[0], :win.shape[1]] = win
        sizes[i] = win.shape[:2]
        offsets[i] = r, q
    return windows, sizes, offsets


def _accumulate_windows(total, logits, sizes, offsets):
    """total + each window's softmax probabilities added at its offset, inside its true size.

    total (H, W, K) float32 canvas (the image, or a larger bucket holding it at the top-left);
    logits (N, ch, cw, K); sizes, offsets (N, 2) int32. One scatter-add over all windows: pixels
    outside a window's true size add 0 (and an empty window adds nothing).
    """
    n, ch, cw, _ = logits.shape
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    rows = jnp.arange(ch)[None, :]
    cols = jnp.arange(cw)[None, :]
    inside = ((rows < sizes[:, 0:1])[:, :, None] & (cols < sizes[:, 1:2])[:, None, :])
    probs = jnp.where(inside[..., None], probs, 0.0)
    r = (offsets[:, 0:1] + rows)[:, :, None]  # (N, ch, 1)
    c = (offsets[:, 1:2] + cols)[:, None, :]  # (N, 1, cw)
    # Positions past the canvas are outside every true window (probabilities 0): dropped.
    return total.at[r, c].add(probs, mode="drop")


_accumulate_jit = jax.jit(_accumulate_windows, donate_argnums=(0,))


def accumulate_windows(total: jax.Array, logits: jax.Array, sizes: Any, offsets: Any) -> jax.Array:
    """Jitted `_accumulate_windows`; `total` is donated. One compilation per (canvas, N, crop).

    total (H, W, K) float32; logits (N, crop, crop, K); sizes, offsets (N, 2) int (host or device).
    """
    return _accumulate_jit(total, logits, np.asarray(sizes, np.int32),
                           np.asarray(offsets, np.int32))


def sliding_window_probs(logits_fn: Callable, variables, image: Any, crop: int,
                         batch_size: int | None = None, canvas: Sequence[int] | None = None,
                         device=None) -> jax.Array:
    """Softmax probabilities summed over the release's clipped windows of one image (device).

    Args:
      logits_fn: `make_logits_fn(model)`.
      image: (h, w, C) float32 normalised.
      batch_size: windows per model call (the last call is padded with empty windows); default:
        all of the image's windows in one call.
      canvas: (H, W) >= (h, w) of the returned sums (default (h, w)); a bucket shared by many image
        sizes compiles one accumulation for all of them.
      device: where to place the canvas (the model runs where `variables` live).
    Returns:
      (H, W, K) float32; the image is the top-left (h, w), the rest is 0. The release's prediction
      is the argmax over K of that part.
    """
    windows, sizes, offsets = window_batch(image, crop)
    n = len(windows)
    bs = n if batch_size is None else int(batch_size)
    h, w = np.shape(image)[:2]
    ch, cw = (h, w) if canvas is None else (int(canvas[0]), int(canvas[1]))
    if ch < h or cw < w:
        raise ValueError(f"sliding_window_probs: canvas {ch}x{cw} is smaller than the {h}x{w} "
                         "image")
    total = None
    for i in range(0, n, bs):
        chunk = slice(i, i + bs)
        win, size, off = windows[chunk], sizes[chunk], offsets[chunk]
        if len(win) < bs:  # the last call: empty windows keep the batch shape
            pad = bs - len(win)
            win = np.concatenate([win, np.zeros((pad, *win.shape[1:]), np.float32)])
            size = np.concatenate([size, np.zeros((pad, 2), np.int32)])
            off = np.concatenate([off, np.zeros((pad, 2), np.int32)])
        logits = logits_fn(variables, win, size)
        if total is None:
            total = jax.device_put(np.zeros((ch, cw, logits.shape[-1]), np.float32), device)
        total = accumulate_windows(total, logits, size, off)
    return total
