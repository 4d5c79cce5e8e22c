"""The augmentation ops: geometry keeps image and mask aligned, views share geometry, stateless seeds."""
import io
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from allspark_jax.data import augment
from allspark_jax.data import datasets
from allspark_jax.data import input_pipeline
from conftest import make_options

MEAN = np.array(datasets.IMAGENET_MEAN, np.float32)
STD = np.array(datasets.IMAGENET_STD, np.float32)


def _denorm255(x):
    return (x * STD + MEAN) * 255.0


def _label_image(rng, h, w):
    """Random rectangles of labels 0..4 and an image whose red channel encodes the label."""
    labels = np.zeros((h, w), np.uint8)
    for _ in range(4):
        y0, x0 = rng.integers(0, h - 8), rng.integers(0, w - 8)
        labels[y0:y0 + rng.integers(8, h // 2 + 9), x0:x0 + rng.integers(8, w // 2 + 9)] = rng.integers(1, 5)
    image = np.stack([10 + 50 * labels.astype(np.int32), 255 - 50 * labels.astype(np.int32),
                      np.full_like(labels, 128, dtype=np.int32)], -1).astype(np.uint8)
    return image, labels


@pytest.fixture(scope="module")
def aligned_root(tmp_path_factory):
    """Lossless PNG images whose red channel encodes the mask; sizes vary around the crop size."""
    root = tmp_path_factory.mktemp("data_aligned")
    (root / "JPEGImages").mkdir()
    (root / "SegmentationClass").mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(8):
        h, w = int(rng.integers(30, 60)), int(rng.integers(30, 60))
        image, labels = _label_image(rng, h, w)
        Image.fromarray(image).save(root / "JPEGImages" / f"{i}.png")
        Image.fromarray(labels, mode="L").save(root / "SegmentationClass" / f"{i}.png")
        lines.append(f"JPEGImages/{i}.png SegmentationClass/{i}.png\n")
    (root / "labeled.txt").write_text("".join(lines[:4]))
    (root / "unlabeled.txt").write_text("".join(lines[4:] * 2))
    return str(root)


def _interior(mask, r=2):
    """True where the (2r+1)^2 neighbourhood of `mask` holds one label (no label edge and no crop
    border near: a crop border pixel's image value was interpolated from outside the crop)."""
    p = np.pad(mask, r, constant_values=-1)
    ok = np.ones_like(mask, bool)
    h, w = mask.shape
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            ok &= p[dy:dy + h, dx:dx + w] == mask
    return ok


def test_geometry_keeps_image_and_mask_aligned(aligned_root):
    config = make_options(3, name="pascal", root=aligned_root,
                          split=os.path.join(aligned_root, "labeled.txt"), crop_size=40,
                          batch_size=4, labeled_strong=False, num_classes=21)
    it = input_pipeline.create_train_iterator(config, process_index=0, process_count=1)
    checked = padded = 0
    for _ in range(6):
        b = next(it)
        for image, mask, weak, pad in zip(b["image_l"], b["mask_l"], b["image_u_w"], b["pad_u"]):
            est = np.round((_denorm255(image)[..., 0] - 10) / 50).astype(np.int32)
            valid = (mask != 255) & _interior(mask)
            np.testing.assert_array_equal(est[valid], mask[valid])
            checked += valid.sum()
            # padding: mask 255 and image 0 exactly
            pad_l = np.all(np.abs(_denorm255(image)) < 1e-3, -1)
            assert np.all(mask[pad_l] == 255)
            padded += pad.sum()
            np.testing.assert_allclose(_denorm255(weak)[pad], 0, atol=1e-3)
            assert not np.any(np.all(np.abs(_denorm255(weak)[~pad]) < 1e-3, -1))
    assert checked > 1000 and padded > 0


def test_rescale_sizes_and_ranges():
    seen = set()
    for i in range(200):
        oh, ow = augment.rescaled_size(375, 500, tf.constant([i, 7], tf.int64))
        oh, ow = int(oh), int(ow)
        assert 250 <= ow <= 1000 and oh == int(375 * ow / 500 + 0.5)
        seen.add(ow)
    assert min(seen) < 300 and max(seen) > 950
    oh, ow = augment.rescaled_size(500, 375, tf.constant([1, 1], tf.int64))
    assert int(oh) >= int(ow)


def _seed(a, b=0):
    return tf.constant([a, b], tf.int64)


def test_weak_and_strong_views_share_geometry():
    rng = np.random.default_rng(1)
    image = tf.constant(rng.integers(0, 256, (30, 45, 3)), tf.uint8)
    for i in range(8):
        seed = _seed(i)
        weak_only = augment.augment_unlabeled(image, 40, seed, strong_student=False)
        both = augment.augment_unlabeled(image, 40, seed, strong_student=True, cutmix_prob=1.0)
        np.testing.assert_array_equal(weak_only["image_u_w"], weak_only["image_u_s"])
        np.testing.assert_array_equal(weak_only["image_u_w"], both["image_u_w"])
        np.testing.assert_array_equal(weak_only["pad_u"], both["pad_u"])
        assert not np.any(weak_only["cutmix_u"]) and np.any(both["cutmix_u"])
        # strong == photometric(weak) with the photometric sub-seed
        s_photo = tf.random.experimental.stateless_split(seed, 3)[1]
        weak01 = _denorm255(both["image_u_w"].numpy()) / 255.0
        expected = augment.normalize(augment.photometric(tf.constant(weak01, tf.float32), s_photo))
        np.testing.assert_allclose(both["image_u_s"], expected, atol=2e-4)


TWO_VIEW_KEYS = {"image_u_w", "image_u_s1", "image_u_s2", "pad_u", "cutmix_u1", "cutmix_u2"}


def test_two_strong_views_share_geometry_with_their_own_photometric_draws():
    """UniMatch V2's unlabeled chain: view 1 is the one-view chain's strong view (its seeds), view 2
    the same weak crop through photometric with its own seed (fold_seed(seed, 2))."""
    rng = np.random.default_rng(2)
    image = tf.constant(rng.integers(0, 256, (30, 45, 3)), tf.uint8)
    differ = strong = 0
    for i in range(8):
        seed = _seed(i, 3)
        one = augment.augment_unlabeled(image, 40, seed, strong_student=True, cutmix_prob=0.5)
        two = augment.augment_unlabeled(image, 40, seed, strong_student=True, cutmix_prob=0.5,
                                        strong_views=2)
        assert set(two) == TWO_VIEW_KEYS
        for k in ("image_u_w", "image_u_s1", "image_u_s2"):
            assert two[k].shape == (40, 40, 3) and two[k].dtype == tf.float32
        for k in ("pad_u", "cutmix_u1", "cutmix_u2"):
            assert two[k].shape == (40, 40) and two[k].dtype == tf.bool
        # view 1 and the geometry are the one-view chain's, unchanged
        for a, b in (("image_u_w", "image_u_w"), ("image_u_s1", "image_u_s"), ("pad_u", "pad_u"),
                     ("cutmix_u1", "cutmix_u")):
            np.testing.assert_array_equal(two[a], one[b])
        # view 2 = photometric(the same weak crop) with its own seed: the same geometry
        s_photo2 = tf.random.experimental.stateless_split(augment.fold_seed(seed, 2), 2)[0]
        weak01 = tf.constant(_denorm255(two["image_u_w"].numpy()) / 255.0, tf.float32)
        np.testing.assert_allclose(two["image_u_s2"],
                                   augment.normalize(augment.photometric(weak01, s_photo2)),
                                   atol=2e-4)
        differ += not np.array_equal(two["image_u_s1"], two["image_u_s2"])
        for k in ("image_u_s1", "image_u_s2"):
            strong += not np.array_equal(two[k], two["image_u_w"])
    assert differ == 8
    # a view skips jitter, grey and blur w.p. 0.2 x 0.8 x 0.5 = 0.08 and is then the weak view
    assert strong >= 13
    with pytest.raises(ValueError, match="strong_student"):
        augment.augment_unlabeled(image, 40, _seed(0), strong_student=False, strong_views=2)
    with pytest.raises(ValueError, match="strong_views=3"):
        augment.augment_unlabeled(image, 40, _seed(0), strong_student=True, strong_views=3)


def test_two_views_draw_independent_cutmix_boxes():
    """Each strong view's box is its own draw: on/off disagree about half the time, and two boxes
    that are both on differ."""
    image = tf.constant(np.full((12, 12, 3), 100, np.uint8))
    on1, on2, both_same = [], [], 0
    for i in range(64):
        out = augment.augment_unlabeled(image, 16, _seed(i, 5), strong_student=True,
                                        cutmix_prob=0.5, strong_views=2)
        b1, b2 = out["cutmix_u1"].numpy(), out["cutmix_u2"].numpy()
        on1.append(b1.any())
        on2.append(b2.any())
        both_same += b1.any() and b2.any() and np.array_equal(b1, b2)
    on1, on2 = np.array(on1), np.array(on2)
    assert 16 <= on1.sum() <= 48 and 16 <= on2.sum() <= 48  # p = 0.5 each
    assert 16 <= (on1 != on2).sum() <= 48  # independent: they disagree in half the draws
    assert (on1 & on2).sum() > 0 and both_same == 0


def test_photometric_ops_semantics():
    x = tf.random.stateless_uniform((16, 16, 3), _seed(0))
    np.testing.assert_allclose(augment.adjust_brightness(x, 1.0), x)
    np.testing.assert_allclose(augment.adjust_contrast(x, 1.0), x, atol=1e-6)
    np.testing.assert_allclose(augment.adjust_saturation(x, 1.0), x, atol=1e-6)
    np.testing.assert_allclose(augment.adjust_hue(x, 0.0), x, atol=1e-5)
    g = augment.adjust_saturation(x, 0.0).numpy()
    np.testing.assert_allclose(g[..., 0], g[..., 1], atol=1e-6)
    assert np.ptp(augment.adjust_contrast(x, 0.0).numpy()) < 1e-6
    c = tf.ones((20, 20, 3)) * 0.3
    np.testing.assert_allclose(augment.gaussian_blur(c, 1.5), c, atol=1e-6)
    outs = {augment.photometric(x, _seed(i)).numpy().tobytes() for i in range(6)}
    assert len(outs) == 6
    np.testing.assert_array_equal(augment.photometric(x, _seed(4)), augment.photometric(x, _seed(4)))
    y = augment.photometric(x, _seed(5)).numpy()
    assert y.min() >= 0 and y.max() <= 1


def test_cutmix_box_statistics():
    areas, on = [], 0
    for i in range(100):
        box = augment.cutmix_box(64, _seed(i), 0.5).numpy()
        if box.any():
            on += 1
            ys, xs = np.nonzero(box)
            h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
            assert box.sum() == h * w  # a rectangle
            areas.append(box.sum() / 64 ** 2)
    assert 30 < on < 70
    assert min(areas) > 0.005 and max(areas) < 0.41


def test_decode_palette_and_gray_masks():
    labels = np.array([[0, 1, 2], [20, 255, 7]], np.uint8)
    for mode in ("P", "L"):
        im = Image.fromarray(labels, mode=mode)
        if mode == "P":
            im.putpalette(datasets.voc_palette().reshape(-1).tolist())
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out = augment.decode_mask(tf.constant(buf.getvalue()), tf.constant("m.png"), 21)
        np.testing.assert_array_equal(out, labels)


@pytest.mark.parametrize("h,w", [(30, 45), (47, 20), (64, 64)])
def test_fused_geometry_equals_rescale_then_pad_crop(h, w):
    rng = np.random.default_rng(h)
    image = tf.constant(rng.integers(0, 256, (h, w, 3)), tf.uint8)
    mask = tf.constant(rng.integers(0, 21, (h, w)), tf.uint8)
    for i in range(12):
        s_scale, s_crop = _seed(i, 1), _seed(i, 2)
        ref_i, ref_m = augment.random_rescale(image, mask, s_scale)
        ref_i, ref_m, ref_p = augment.pad_crop_flip(ref_i, ref_m, 40, s_crop)
        got_i, got_m, got_p = augment.rescale_pad_crop_flip(image, mask, 40, s_scale, s_crop)
        np.testing.assert_array_equal(got_p, ref_p)
        np.testing.assert_array_equal(got_m, ref_m)
        np.testing.assert_allclose(got_i, ref_i, atol=0.05)
