"""The release's per-image evaluation modes as jitted programs.

Modes (`config.eval.mode`):
  * ``original``       the whole image at its own size;
  * ``center_crop``    the central crop_size x crop_size window (image and mask);
  * ``sliding_window`` windows of crop_size at stride floor(2/3 * crop_size), clipped at the borders,
                       softmax probabilities summed, argmax.
Every image is predicted on its own ("eval" mode), so its result never depends on the others.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

EVAL_MODES = ("original", "center_crop", "sliding_window")


# Compilation: the model is jitted once per distinct input shape (cached by jax.jit for the life of
# the Predictor). Pascal and COCO validation images come in hundreds of sizes, so a first
# evaluation in "original" mode spends much of its time compiling (seconds per shape on an
# accelerator); later evaluations in the same process reuse the programs, and
# `config.compilation_cache` keeps them across processes. center_crop compiles one shape (when no
# image is smaller than the crop); sliding_window compiles one program per distinct WINDOW shape (the
# crop, plus the clipped border windows), shared by all images, plus a small accumulation program
# per (image shape, window shape) pair.


def window_starts(size: int, crop: int) -> list[int]:
    """The release's window offsets along one axis: 0, s, 2s, ... while < size, s = int(2/3 crop).

    Windows are clipped at the border, not shifted back: the last ones can be smaller than `crop`.
    """
    stride = int(crop * 2 / 3)
    if stride < 1:
        raise ValueError(f"sliding_window: crop size {crop} gives a zero stride")
    return list(range(0, size, stride))


def center_crop(image: np.ndarray, mask: np.ndarray | None, crop: int):
    """The release's center crop: `x[start:start + crop]` with start = (size - crop) // 2 per axis.

    Plain Python slicing, quirks included: an axis shorter than `crop` gives a negative start, which
    slices from the end (e.g. size 400, crop 513: rows 343..399, the last 57).
    """
    h, w = image.shape[:2]
    sh, sw = (h - crop) // 2, (w - crop) // 2
    image = image[sh:sh + crop, sw:sw + crop]
    if mask is not None:
        mask = mask[sh:sh + crop, sw:sw + crop]
    return image, mask


def _logits(model, variables, x):
    """(H, W, 3) -> (H, W, K) float32 logits, the image alone in its batch ("eval" mode)."""
    return model.apply(variables, x[None], mode="eval")[0]


def _accumulate(total, logits, row, col):
    """total[row:row + h, col:col + w] += softmax(logits) (offsets traced: one program per shape)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    start = (row, col, jnp.zeros_like(row))
    window = jax.lax.dynamic_slice(total, start, probs.shape)
    return jax.lax.dynamic_update_slice(total, window + probs, start)


# The model is a static argument: Predictors of equal models share compiled programs.
_logits_jit = jax.jit(_logits, static_argnums=0)
_argmax = jax.jit(lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32))
_accumulate_jit = jax.jit(_accumulate, donate_argnums=(0,))


class Predictor:
    """Per-image predictions of a model with the release's evaluation modes.

    `predict(variables, image)` takes an (H, W, 3) normalised image and returns the (h, w) int32
    prediction (h, w = the crop for center_crop, the image size otherwise). The model is jitted per
    input shape (see the note above).
    """

    def __init__(self, model, mode: str = "original", crop_size: int | None = None):
        if mode not in EVAL_MODES:
            raise ValueError(f"config.eval.mode must be one of {EVAL_MODES}, got {mode!r}")
        if mode != "original" and not crop_size:
            raise ValueError(f"eval mode {mode!r} needs a crop size (config.eval.crop_size or "
                             "config.data.crop_size)")
        self.model, self.mode, self.crop = model, mode, crop_size
        self.logits_fn = functools.partial(_logits_jit, model)

    def prepare(self, image, mask=None):
        """Host-side cropping (center_crop); returns (image, mask) as the model will see them."""
        if self.mode == "center_crop":
            return center_crop(image, mask, self.crop)
        return image, mask

    def sliding_window_probs(self, variables, image, device=None):
        """Softmax probabilities summed over the release's clipped windows: (H, W, K) on device."""
        image = np.asarray(image, np.float32)
        h, w = image.shape[:2]
        crop, total = self.crop, None
        for r in window_starts(h, crop):
            for c in window_starts(w, crop):
                win = jax.device_put(image[r:min(h, r + crop), c:min(w, c + crop)], device)
                logits = self.logits_fn(variables, win)
                if total is None:
                    total = jax.device_put(np.zeros((h, w, logits.shape[-1]), np.float32), device)
                total = _accumulate_jit(total, logits, np.int32(r), np.int32(c))
        return total

    def predict_async(self, variables, image, device=None):
        """Dispatches one image (already `prepare`d) and returns the un-fetched device result."""
        if self.mode == "sliding_window":
            return _argmax(self.sliding_window_probs(variables, image, device))
        x = jax.device_put(np.asarray(image, np.float32), device)
        return _argmax(self.logits_fn(variables, x))

    def predict(self, variables, image):
        image, _ = self.prepare(np.asarray(image))
        return np.asarray(self.predict_async(variables, image))
