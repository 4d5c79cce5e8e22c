"""The release's augmentation chain as TensorFlow ops on ONE example (run inside tf.data map fns).

All randomness is stateless: every function takes `seed`, a (2,) int tensor, and derives sub-seeds
from it with `tf.random.experimental.stateless_split`, so an example's augmentation is a pure function
of (its bytes, its seed). Layouts: images are (H, W, 3) HWC, masks (H, W); `S` is the crop size.

Chain (the release's): random rescale (long side uniform integer in [0.5 L, 2.0 L], image bilinear,
mask nearest) -> pad right/bottom to S (image 0, mask 255) -> random S x S crop -> horizontal flip p 0.5
-> [strong only] colour jitter p 0.8 (brightness/contrast/saturation 0.5, hue 0.25, the four in random
order as torchvision's ColorJitter) -> grayscale p 0.2 -> Gaussian blur p 0.5, sigma U[0.1, 2.0]
-> [0, 1] -> ImageNet normalisation. Photometric ops work on float images in [0, 1], clipped after
each op (the release works on uint8 PIL images, so it also rounds after each op).
UniMatch V2 (its dataset/semi.py) takes the same geometry, marking the padding for its ignore mask,
and draws this same strong chain (same ops, probabilities and ranges, on uint8 PIL images as the
release) independently for each of its two strong views of one crop, then a CutMix box per view
(probability 0.5: `data.cutmix_prob` here): `augment_unlabeled(strong_views=2)`.

`random_rescale` + `pad_crop_flip` are the literal chain; the pipeline uses `rescale_pad_crop_flip`,
which gives the same result (tested) while resampling only the pixels under the crop window.
"""
from __future__ import annotations

import numpy as np

from allspark_jax.data.datasets import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD
from allspark_jax.data.host_tensorflow import tf

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # PIL's convert('L')
BLUR_RADIUS = 6  # taps each side: 3 * max sigma (2.0)
_CUTMIX_TRIES = 32


# ------------------------------------------------------------------------------------------ seeds


def fold_seed(seed, *data) -> tf.Tensor:
    """Folds integers `data` into a (2,) seed, one after the other; returns a (2,) int64 tensor."""
    seed = tf.cast(seed, tf.int64)
    for d in data:
        seed = tf.cast(tf.random.experimental.stateless_fold_in(seed, tf.cast(d, tf.int64)), tf.int64)
    return seed


def _split(seed, n: int) -> list[tf.Tensor]:
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=n)
    return [seeds[i] for i in range(n)]


def _uniform(seed, minval=0.0, maxval=1.0, shape=()):
    return tf.random.stateless_uniform(shape, seed, minval=minval, maxval=maxval, dtype=tf.float32)


def _randint(seed, low, high_inclusive):
    """Uniform integer in [low, high_inclusive] (like Python's random.randint); int32 scalar."""
    low = tf.cast(low, tf.int32)
    high = tf.cast(high_inclusive, tf.int32) + 1
    return tf.random.stateless_uniform((), seed, minval=low, maxval=tf.maximum(high, low + 1),
                                       dtype=tf.int32)


# ------------------------------------------------------------------------------- decoding / checks


def _assert(cond, *data) -> tf.Operation:
    return tf.debugging.Assert(cond, list(data), summarize=8)


def _bytes_at(data: tf.Tensor, pos, n: int) -> tf.Tensor:
    """The n bytes of `data` from byte `pos` as an (n,) int32 tensor, zeros past the end."""
    pos = tf.minimum(tf.cast(pos, tf.int32), tf.strings.length(data))
    return tf.cast(tf.io.decode_raw(tf.strings.substr(data, pos, n), tf.uint8, fixed_length=n),
                   tf.int32)


def _jpeg_size(data: tf.Tensor) -> tf.Tensor:
    """(height, width) of a JPEG's frame header (SOF0..SOF15 marker), found by walking the marker
    segments from the start; (0, 0) when the chain of segments breaks first (the decoder then
    reports the file)."""
    n = tf.strings.length(data)

    def body(pos, hw, found):
        b = _bytes_at(data, pos, 9)  # FF marker length(2) precision height(2) width(2)
        marker = b[1]
        is_sof = ((b[0] == 0xFF) & (marker >= 0xC0) & (marker <= 0xCF) & (marker != 0xC4)
                  & (marker != 0xC8) & (marker != 0xCC))  # DHT, JPG and DAC share the range
        hw = tf.where(is_sof, tf.stack([b[5] * 256 + b[6], b[7] * 256 + b[8]]), hw)
        step = 2 + b[2] * 256 + b[3]
        return tf.where(b[0] == 0xFF, pos + step, n), hw, is_sof

    _, hw, _ = tf.while_loop(lambda pos, hw, found: (pos + 9 <= n) & ~found, body,
                             (tf.constant(2), tf.zeros(2, tf.int32), tf.constant(False)))
    return hw


def header_size(data: tf.Tensor) -> tf.Tensor:
    """(height, width), int64, that a JPEG's frame header or a PNG's IHDR chunk declares, read
    without decoding; (0, 0) for other bytes."""
    is_png = tf.equal(tf.strings.substr(data, 0, 4), b"\x89PNG")
    is_jpeg = tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff")

    def png():  # IHDR: width then height, big-endian uint32 at bytes 16..23
        b = tf.cast(_bytes_at(data, 16, 8), tf.int64)
        w, h = [((b[k] * 256 + b[k + 1]) * 256 + b[k + 2]) * 256 + b[k + 3] for k in (0, 4)]
        return tf.stack([h, w])

    return tf.case([(is_png, png), (is_jpeg, lambda: tf.cast(_jpeg_size(data), tf.int64))],
                   default=lambda: tf.zeros(2, tf.int64))


def _check_pixels(data: tf.Tensor, path: tf.Tensor, max_pixels: int | None, what: str):
    """Asserts that the size in the header of `data` is at most `max_pixels` (None: no bound)."""
    if not max_pixels:
        return tf.no_op()
    hw = header_size(data)
    return _assert(hw[0] * hw[1] <= max_pixels, f"{what} too large (expected at most {max_pixels} "
                   "pixels, data.max_image_pixels):", path, "header declares height, width:", hw)


def decode_image(data: tf.Tensor, path: tf.Tensor, max_pixels: int | None = None) -> tf.Tensor:
    """Decodes JPEG/PNG bytes into (H, W, 3) uint8; a non-JPEG/PNG file, or one whose header
    declares more than `max_pixels` pixels (checked before decoding), fails naming `path`."""
    head = tf.strings.substr(data, 0, 4)
    is_jpeg = tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff")
    is_png = tf.equal(head, b"\x89PNG")
    with tf.control_dependencies([_assert(
        is_jpeg | is_png, "Unreadable image (expected a JPEG or PNG file):", path),
            _check_pixels(data, path, max_pixels, "Image")]):
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _voc_index_from_rgb(rgb: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Inverts the VOC colour map: (H, W, 3) uint8 -> ((H, W) uint8 index, bool: all colours in map)."""
    c = tf.cast(rgb, tf.int32)
    index = tf.zeros(tf.shape(c)[:2], tf.int32)
    for j in range(3):  # bit planes: bit (7 - j) of channel ch is bit (3 j + ch) of the index
        for ch in range(3):
            if 3 * j + ch < 8:
                bit = tf.bitwise.bitwise_and(tf.bitwise.right_shift(c[..., ch], 7 - j), 1)
                index += tf.bitwise.left_shift(bit, 3 * j + ch)
    # Re-encode to check that every colour was a palette colour.
    recon = []
    for ch in range(3):
        v = tf.zeros_like(index)
        for j in range(3):
            if 3 * j + ch < 8:
                bit = tf.bitwise.bitwise_and(tf.bitwise.right_shift(index, 3 * j + ch), 1)
                v += tf.bitwise.left_shift(bit, 7 - j)
        recon.append(v)
    ok = tf.reduce_all(tf.equal(tf.stack(recon, -1), c))
    return tf.cast(index, tf.uint8), ok


def _index_from_palette(rgb: tf.Tensor, colours, indices) -> tuple[tf.Tensor, tf.Tensor]:
    """Maps (H, W, 3) uint8 colours to their indices in a custom palette (`colours[i]` has index
    `indices[i]`); returns ((H, W) uint8 index, bool: all colours in the palette)."""
    codes = np.asarray([(r << 16) | (g << 8) | b for r, g, b in colours], np.int64)
    order = np.argsort(codes)
    keys = tf.constant(codes[order])
    values = tf.constant(np.asarray(indices, np.int64)[order])
    c = tf.cast(rgb, tf.int64)
    pixel = tf.reshape(c[..., 0] * 65536 + c[..., 1] * 256 + c[..., 2], [-1])
    pos = tf.minimum(tf.searchsorted(keys, pixel), len(codes) - 1)
    ok = tf.reduce_all(tf.equal(tf.gather(keys, pos), pixel))
    index = tf.reshape(tf.gather(values, pos), tf.shape(rgb)[:2])
    return tf.cast(index, tf.uint8), ok


def decode_mask(data: tf.Tensor, path: tf.Tensor, num_classes: int,
                ignore_index: int = IGNORE_INDEX, palette=None,
                max_pixels: int | None = None) -> tf.Tensor:
    """Decodes a label PNG into (H, W) uint8 labels, checking 0 <= label < num_classes or ignored.

    Grayscale PNGs hold labels directly; palette PNGs (VOC's SegmentationClass) are decoded to RGB by
    TensorFlow, so their colours are mapped back to indices through the VOC colour map, or through
    `palette` (a custom dataset's colours: class k's at k, then optionally the ignore colour). A
    colour outside the palette fails naming `path`. Pixels equal to `ignore_index` (a custom
    dataset's ignore value; 255 for the official datasets) come out as 255. A mask whose header
    declares more than `max_pixels` pixels fails before decoding. Errors name `path`.
    """
    # A PNG holds its 8-byte signature and the 25-byte IHDR chunk (colour type at byte 25) first.
    is_png = tf.equal(tf.strings.substr(data, 0, 4), b"\x89PNG") & (tf.strings.length(data) >= 33)
    with tf.control_dependencies([_assert(is_png, "Unreadable mask (expected a PNG file):", path),
                                  _check_pixels(data, path, max_pixels, "Mask")]):
        color_type = tf.strings.substr(data, 25, 1)  # IHDR colour type byte
    is_palette = tf.equal(color_type, b"\x03")
    is_gray = tf.equal(color_type, b"\x00") | tf.equal(color_type, b"\x04")
    if palette is None:
        to_index, which = _voc_index_from_rgb, "the VOC palette"
    else:
        indices = list(range(num_classes)) + [ignore_index] * (len(palette) - num_classes)
        to_index = lambda rgb: _index_from_palette(rgb, palette, indices)  # noqa: E731
        which = "data.custom.palette"
    with tf.control_dependencies([_assert(
        is_palette | is_gray, "Mask is an RGB PNG (expected a palette or grayscale PNG of labels):",
        path)]):
        def from_palette():
            index, ok = to_index(tf.io.decode_png(data, channels=3))
            with tf.control_dependencies([_assert(
                ok, f"Mask palette PNG uses colours outside {which} (expected {which} or "
                "grayscale labels):", path)]):
                return tf.identity(index)

        mask = tf.cond(is_palette, from_palette, lambda: tf.io.decode_png(data, channels=1)[..., 0])
    mask.set_shape([None, None])
    m = tf.cast(mask, tf.int32)
    bad = (m >= num_classes) & (m != ignore_index)
    with tf.control_dependencies([_assert(
        tf.logical_not(tf.reduce_any(bad)),
        f"Mask label outside [0, {num_classes - 1}] and not {ignore_index} "
        f"(data.num_classes={num_classes}):",
        path, "max label:", tf.reduce_max(tf.where(bad, m, 0)))]):
        if ignore_index == IGNORE_INDEX:
            return tf.identity(mask)
        return tf.where(tf.equal(mask, ignore_index), tf.constant(IGNORE_INDEX, tf.uint8), mask)


def check_same_size(image: tf.Tensor, mask: tf.Tensor, image_path, mask_path) -> tf.Tensor:
    """Returns `image` after asserting that image and mask share (H, W); the error names both."""
    ok = tf.reduce_all(tf.equal(tf.shape(image)[:2], tf.shape(mask)[:2]))
    with tf.control_dependencies([_assert(
        ok, "Image/mask size mismatch (expected equal height and width):", image_path,
        tf.shape(image)[:2], mask_path, tf.shape(mask)[:2])]):
        return tf.identity(image)


# --------------------------------------------------------------------------------------- geometry


def rescaled_size(height, width, seed, ratio_range=(0.5, 2.0)) -> tuple[tf.Tensor, tf.Tensor]:
    """The release's random rescale size: long side uniform integer in [int(r0 L), int(r1 L)]."""
    h = tf.cast(height, tf.float64)
    w = tf.cast(width, tf.float64)
    long = tf.maximum(h, w)
    lo = tf.cast(tf.floor(long * ratio_range[0]), tf.int32)
    hi = tf.cast(tf.floor(long * ratio_range[1]), tf.int32)
    long_side = tf.cast(_randint(seed, lo, hi), tf.float64)
    short = tf.floor(tf.minimum(h, w) * long_side / long + 0.5)
    oh = tf.where(h > w, long_side, short)
    ow = tf.where(h > w, short, long_side)
    return tf.cast(oh, tf.int32), tf.cast(ow, tf.int32)


def random_rescale(image: tf.Tensor, mask: tf.Tensor | None, seed,
                   ratio_range=(0.5, 2.0)) -> tuple[tf.Tensor, tf.Tensor | None]:
    """Rescales (H, W, 3) `image` bilinearly (float32 out) and (H, W) `mask` by nearest neighbour."""
    shape = tf.shape(image)
    oh, ow = rescaled_size(shape[0], shape[1], seed, ratio_range)
    out = tf.image.resize(tf.cast(image, tf.float32), tf.stack([oh, ow]), method="bilinear",
                          antialias=True)
    if mask is None:
        return out, None
    m = tf.image.resize(mask[..., None], tf.stack([oh, ow]), method="nearest")[..., 0]
    return out, m


def pad_crop_flip(image: tf.Tensor, mask: tf.Tensor | None, crop: int, seed
                  ) -> tuple[tf.Tensor, tf.Tensor | None, tf.Tensor]:
    """Pads right/bottom to `crop` (image 0, mask 255), crops a random crop x crop window, flips p 0.5.

    Args:
      image: (H, W, 3) float32.
      mask: (H, W) integer labels or None.
      crop: S.
      seed: (2,) seed.
    Returns:
      image (S, S, 3) float32, mask (S, S) int32 (255 on padding) or None, pad (S, S) bool (True where
      the crop is padding).
    """
    s_x, s_y, s_flip = _split(seed, 3)
    parts = [tf.cast(image, tf.float32)]
    if mask is not None:
        parts.append(tf.cast(mask, tf.float32)[..., None])
    parts.append(tf.ones_like(parts[0][..., :1]))  # validity channel: 0 after padding
    stack = tf.concat(parts, -1)
    shape = tf.shape(stack)
    ph = tf.maximum(crop - shape[0], 0)
    pw = tf.maximum(crop - shape[1], 0)
    stack = tf.pad(stack, [[0, ph], [0, pw], [0, 0]])
    h, w = shape[0] + ph, shape[1] + pw
    x = _randint(s_x, 0, w - crop)
    y = _randint(s_y, 0, h - crop)
    stack = stack[y:y + crop, x:x + crop]
    flip = _uniform(s_flip) < 0.5
    stack = tf.cond(flip, lambda: tf.reverse(stack, [1]), lambda: stack)
    c = stack.shape[-1]
    stack = tf.ensure_shape(stack, [crop, crop, c])
    pad = stack[..., -1] < 0.5
    out_image = stack[..., :3]
    if mask is None:
        return out_image, None, pad
    out_mask = tf.where(pad, IGNORE_INDEX, tf.cast(tf.round(stack[..., 3]), tf.int32))
    return out_image, out_mask, pad


def rescale_pad_crop_flip(image: tf.Tensor, mask: tf.Tensor | None, crop: int, scale_seed,
                          crop_seed, ratio_range=(0.5, 2.0)
                          ) -> tuple[tf.Tensor, tf.Tensor | None, tf.Tensor]:
    """random_rescale followed by pad_crop_flip (same seeds, same result), computing only the crop.

    When the image grows, only the source region under the crop window is resampled (bilinear with
    half-pixel centres, as tf.image.resize, via crop_and_resize on an edge-padded source); when it
    shrinks, the whole image is resized with antialiasing and then cropped. The mask is resampled by
    nearest neighbour (TF's half-pixel rule) by gathering rows and columns.

    Args:
      image: (H, W, 3) uint8 or float; mask: (H, W) integer labels or None; crop: S.
      scale_seed: seed of the rescale; crop_seed: seed of the crop offset and flip.
    Returns:
      image (S, S, 3) float32 in [0, 255], mask (S, S) int32 (255 on padding) or None, pad (S, S) bool.
    """
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    oh, ow = rescaled_size(h, w, scale_seed, ratio_range)
    s_x, s_y, s_flip = _split(crop_seed, 3)
    x = _randint(s_x, 0, tf.maximum(ow, crop) - crop)
    y = _randint(s_y, 0, tf.maximum(oh, crop) - crop)
    hh = tf.minimum(crop, oh - y)  # rows / cols of the crop inside the rescaled image
    ww = tf.minimum(crop, ow - x)
    img = tf.cast(image, tf.float32)
    scale_y = tf.cast(h, tf.float32) / tf.cast(oh, tf.float32)  # source pixels per output pixel
    scale_x = tf.cast(w, tf.float32) / tf.cast(ow, tf.float32)

    def shrink():
        full = tf.image.resize(img, tf.stack([oh, ow]), method="bilinear", antialias=True)
        return full[y:y + hh, x:x + ww]

    def grow():
        padded = tf.pad(img, [[1, 1], [1, 1], [0, 0]], mode="SYMMETRIC")  # = clamping at the border
        y0 = (tf.cast(y, tf.float32) + 0.5) * scale_y + 0.5  # +1 for the padding, -0.5 half pixel
        x0 = (tf.cast(x, tf.float32) + 0.5) * scale_x + 0.5
        y1 = y0 + tf.cast(hh - 1, tf.float32) * scale_y
        x1 = x0 + tf.cast(ww - 1, tf.float32) * scale_x
        hp = tf.cast(h + 1, tf.float32)
        wp = tf.cast(w + 1, tf.float32)
        box = tf.stack([y0 / hp, x0 / wp, y1 / hp, x1 / wp])[None]
        return tf.image.crop_and_resize(padded[None], box, [0], tf.stack([hh, ww]))[0]

    shrinking = tf.maximum(oh, ow) < tf.maximum(h, w)
    region = tf.cond(shrinking, shrink, grow)
    pad_hw = [[0, crop - hh], [0, crop - ww]]
    out = tf.pad(region, pad_hw + [[0, 0]])
    rows = tf.range(crop)
    pad = ~((rows < hh)[:, None] & (rows < ww)[None, :])
    out_mask = None
    if mask is not None:
        src_r = tf.minimum(tf.cast(tf.floor((tf.cast(y + tf.range(hh), tf.float32) + 0.5) * scale_y),
                                   tf.int32), h - 1)
        src_c = tf.minimum(tf.cast(tf.floor((tf.cast(x + tf.range(ww), tf.float32) + 0.5) * scale_x),
                                   tf.int32), w - 1)
        m = tf.gather(tf.gather(tf.cast(mask, tf.int32), src_r, axis=0), src_c, axis=1)
        out_mask = tf.pad(m, pad_hw, constant_values=IGNORE_INDEX)
    flip = _uniform(s_flip) < 0.5
    if out_mask is None:
        out, pad = tf.cond(flip, lambda: (tf.reverse(out, [1]), tf.reverse(pad, [1])),
                           lambda: (out, pad))
    else:
        out, pad, out_mask = tf.cond(
            flip, lambda: (tf.reverse(out, [1]), tf.reverse(pad, [1]), tf.reverse(out_mask, [1])),
            lambda: (out, pad, out_mask))
        out_mask = tf.ensure_shape(out_mask, [crop, crop])
    return tf.ensure_shape(out, [crop, crop, 3]), out_mask, tf.ensure_shape(pad, [crop, crop])


# ------------------------------------------------------------------------------------ photometric


def _gray(x: tf.Tensor) -> tf.Tensor:
    return tf.reduce_sum(x * tf.constant(GRAY_WEIGHTS, x.dtype), -1, keepdims=True)


def adjust_brightness(x, f):
    return tf.clip_by_value(x * f, 0.0, 1.0)


def adjust_contrast(x, f):
    mean = tf.reduce_mean(_gray(x))
    return tf.clip_by_value(mean + f * (x - mean), 0.0, 1.0)


def adjust_saturation(x, f):
    g = _gray(x)
    return tf.clip_by_value(g + f * (x - g), 0.0, 1.0)


def adjust_hue(x, f):
    return tf.clip_by_value(tf.image.adjust_hue(x, f), 0.0, 1.0)


def color_jitter(x: tf.Tensor, seed, brightness=0.5, contrast=0.5, saturation=0.5, hue=0.25
                 ) -> tf.Tensor:
    """torchvision ColorJitter on (H, W, 3) float in [0, 1]: the four ops in a random order."""
    s_order, s_b, s_c, s_s, s_h = _split(seed, 5)
    factors = [_uniform(s_b, 1 - brightness, 1 + brightness),
               _uniform(s_c, 1 - contrast, 1 + contrast),
               _uniform(s_s, 1 - saturation, 1 + saturation),
               _uniform(s_h, -hue, hue)]
    ops = [adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue]
    order = tf.argsort(_uniform(s_order, shape=(4,)))
    for pos in range(4):
        branches = [lambda op=op, f=f, x=x: op(x, f) for op, f in zip(ops, factors)]
        x = tf.switch_case(order[pos], branches)
        x.set_shape([None, None, 3])
    return x


def gaussian_blur(x: tf.Tensor, sigma) -> tf.Tensor:
    """Separable Gaussian blur of (H, W, 3) `x` with std `sigma` (13 taps, symmetric borders)."""
    r = BLUR_RADIUS
    t = tf.range(-r, r + 1, dtype=tf.float32)
    k = tf.exp(-0.5 * tf.square(t / sigma))
    k = k / tf.reduce_sum(k)
    y = tf.pad(x[None], [[0, 0], [r, r], [r, r], [0, 0]], mode="SYMMETRIC")
    kh = tf.tile(k[:, None, None, None], [1, 1, 3, 1])
    kw = tf.tile(k[None, :, None, None], [1, 1, 3, 1])
    y = tf.nn.depthwise_conv2d(y, kh, [1, 1, 1, 1], "VALID")
    y = tf.nn.depthwise_conv2d(y, kw, [1, 1, 1, 1], "VALID")
    return y[0]


def photometric(x: tf.Tensor, seed, jitter_p=0.8, gray_p=0.2, blur_p=0.5) -> tf.Tensor:
    """The release's strong photometric chain on (H, W, 3) float in [0, 1]; returns the same layout."""
    s_pj, s_j, s_pg, s_pb, s_sigma = _split(seed, 5)
    x = tf.cond(_uniform(s_pj) < jitter_p, lambda: color_jitter(x, s_j), lambda: x)
    x = tf.cond(_uniform(s_pg) < gray_p, lambda: tf.tile(_gray(x), [1, 1, 3]), lambda: x)
    sigma = _uniform(s_sigma, 0.1, 2.0)
    x = tf.cond(_uniform(s_pb) < blur_p, lambda: gaussian_blur(x, sigma), lambda: x)
    x.set_shape([None, None, 3])
    return x


def normalize(x01: tf.Tensor) -> tf.Tensor:
    """(H, W, 3) float in [0, 1] -> ImageNet-normalised float32."""
    return (tf.cast(x01, tf.float32) - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD)


# ----------------------------------------------------------------------------------------- cutmix


def cutmix_box(size: int, seed, prob: float, size_min=0.02, size_max=0.4, ratio_1=0.3,
               ratio_2=1 / 0.3) -> tf.Tensor:
    """UniMatch's obtain_cutmix_box as a (size, size) bool mask (True inside the box), all False w.p. 1-p.

    The release's rejection loop (redraw ratio and corner until the box fits) is run on 32 candidates
    drawn at once, taking the first that fits (the chance that none of them fits is negligible; the
    last one is then clipped into the image).
    """
    s_p, s_area, s_ratio, s_x, s_y = _split(seed, 5)
    if prob <= 0:
        return tf.zeros((size, size), tf.bool)
    area = _uniform(s_area, size_min, size_max) * size * size
    ratio = _uniform(s_ratio, ratio_1, ratio_2, shape=(_CUTMIX_TRIES,))
    cw = tf.cast(tf.sqrt(area / ratio), tf.int32)
    ch = tf.cast(tf.sqrt(area * ratio), tf.int32)
    xs = tf.random.stateless_uniform((_CUTMIX_TRIES,), s_x, 0, size, tf.int32)
    ys = tf.random.stateless_uniform((_CUTMIX_TRIES,), s_y, 0, size, tf.int32)
    fits = (xs + cw <= size) & (ys + ch <= size)
    i = tf.where(tf.reduce_any(fits), tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32),
                 _CUTMIX_TRIES - 1)
    w, h = tf.minimum(cw[i], size), tf.minimum(ch[i], size)
    x, y = tf.minimum(xs[i], size - w), tf.minimum(ys[i], size - h)
    r = tf.range(size)
    box = (((r >= y) & (r < y + h))[:, None]) & (((r >= x) & (r < x + w))[None, :])
    return box & (_uniform(s_p) < prob)


# -------------------------------------------------------------------------------- whole examples


def augment_labeled(image: tf.Tensor, mask: tf.Tensor, crop: int, seed, strong: bool = True,
                    scale_range=(0.5, 2.0)) -> tuple[tf.Tensor, tf.Tensor]:
    """Labeled chain: (H, W, 3) uint8, (H, W) uint8 -> (S, S, 3) float32 normalised, (S, S) int32."""
    s_geo, s_photo = _split(seed, 2)
    s_scale, s_crop = _split(s_geo, 2)
    image, mask, _ = rescale_pad_crop_flip(image, mask, crop, s_scale, s_crop, scale_range)
    x = image / 255.0
    if strong:
        x = photometric(x, s_photo)
    return normalize(x), mask


def augment_unlabeled(image: tf.Tensor, crop: int, seed, strong_student: bool,
                      cutmix_prob: float = 0.0, scale_range=(0.5, 2.0),
                      strong_views: int = 1) -> dict[str, tf.Tensor]:
    """Unlabeled chain: one geometry (rescale, crop, flip) shared by every view of the image.

    strong_views=1 (the release's): returns dict of `image_u_w` (S, S, 3) float32 (teacher: no
    photometric), `image_u_s` (S, S, 3) float32 (student: photometric(weak) if `strong_student`,
    else the weak view), `pad_u` (S, S) bool (True on padding), `cutmix_u` (S, S) bool.
    strong_views=2 (UniMatch V2's dataset/semi.py; needs `strong_student`): `image_u_w`,
    `image_u_s1`, `image_u_s2` (each photometric(weak) with its own draw), `pad_u`, `cutmix_u1`,
    `cutmix_u2` (each view's own box, probability `cutmix_prob`).

    Seeds: `seed` splits into geometry, photometric and box seeds, the one-view chain's and strong
    view 1's; view 2 draws its photometric and box seeds from fold_seed(seed, 2). So view 1 of two
    is the one-view student view of the same seed, and the one-view outputs do not depend on
    `strong_views`.
    """
    if strong_views not in (1, 2):
        raise ValueError(f"strong_views={strong_views}: expected 1 or 2")
    if strong_views == 2 and not strong_student:
        raise ValueError("strong_views=2 needs strong_student=True (two strong views)")
    s_geo, s_photo, s_cut = _split(seed, 3)
    s_scale, s_crop = _split(s_geo, 2)
    image, _, pad = rescale_pad_crop_flip(image, None, crop, s_scale, s_crop, scale_range)
    x = image / 255.0
    weak = normalize(x)
    if strong_views == 1:
        strong = normalize(photometric(x, s_photo)) if strong_student else weak
        return {"image_u_w": weak, "image_u_s": strong, "pad_u": pad,
                "cutmix_u": cutmix_box(crop, s_cut, cutmix_prob)}
    s_photo2, s_cut2 = _split(fold_seed(seed, 2), 2)
    return {"image_u_w": weak, "image_u_s1": normalize(photometric(x, s_photo)),
            "image_u_s2": normalize(photometric(x, s_photo2)), "pad_u": pad,
            "cutmix_u1": cutmix_box(crop, s_cut, cutmix_prob),
            "cutmix_u2": cutmix_box(crop, s_cut2, cutmix_prob)}
