"""Padded batches through DINOv2 + UniMatch V2's DPT (`valid_grid`; the segmentor's `valid_size=`):
each image's true outputs against the image alone, and the evaluation path against UniMatch V2's
own `evaluate` (dpt_tiny_eval.npz, written by tests/data/record_dinov2.py).

One padded batch serves every test: the two recorded images (61 x 75, 50 x 88), a third image at
the whole canvas (72 x 100) and an empty filler slot. None is a multiple of 14; their evaluation
sizes give the token grids 4 x 5, 4 x 6 and 5 x 7, all interpolating dpt_tiny's 37 x 37 position
embeddings. The padding holds noise (pixels, and encoder maps fed to the head), so a layer that
read it would fail the comparison.
"""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from allspark_jax.models import resize
from allspark_jax.models.dinov2 import (DINOv2, DINOv2Config, interpolate_pos_embed,
                                        interpolate_pos_embed_valid, patch_map)
from allspark_jax.models.dpt import (HEAD_SCALE, DPTHead, eval_input_size, eval_input_sizes,
                                     resize_eval_input)
from reference_model import DATA, nhwc, rel_err
from test_dinov2 import unimatch_params

EVAL = np.load(os.path.join(DATA, "dpt_tiny_eval.npz"))
EVAL_META = json.loads(str(EVAL["meta_json"]))
RTOL = 2e-6  # ||out - ref|| / ||ref|| against UniMatch V2
ATOL = 1e-5  # max |padded - alone| / max |alone|: float32 round-off of another summation order
CANVAS = (72, 100)
PATCH = 14


def scaled_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


@functools.lru_cache(maxsize=None)
def images():
    """The batch's images (H, W, 3) (the filler slot excluded) and the padded batch, sizes."""
    recorded = [nhwc(EVAL[f"image{i}_x"])[0] for i in range(len(EVAL_META["sizes"]))]
    third = np.asarray(jax.random.normal(jax.random.PRNGKey(5), CANVAS + (3,)))
    imgs = recorded + [third]
    noise = np.array(jax.random.normal(jax.random.PRNGKey(6), (len(imgs) + 1,) + CANVAS + (3,)))
    batch = noise.copy()
    for b, img in enumerate(imgs):
        batch[b, :img.shape[0], :img.shape[1]] = img
    sizes = np.array([img.shape[:2] for img in imgs] + [(0, 0)], np.int32)
    return imgs, batch, sizes


@functools.lru_cache(maxsize=None)
def model_and_params():
    return unimatch_params("dpt_tiny")


@functools.lru_cache(maxsize=None)
def alone_outputs(b: int):
    """Image b alone, through the static-shape functions: its evaluation-size input, the encoder
    tokens, the head's logits (8 h, 8 w) and the evaluation logits (H, W) (UniMatch V2's
    `evaluate` before the argmax)."""
    model, params = model_and_params()
    x = images()[0][b][None]

    @jax.jit
    def run(params, x):
        size = eval_input_size(x.shape[1:3], PATCH)
        grid = (size[0] // PATCH, size[1] // PATCH)
        xm = resize.resize_bilinear_align_corners(x, size)
        tokens = DINOv2(model.config.backbone).apply({"params": params["backbone"]}, xm, model.config.dpt.layers)
        head = DPTHead(model.config.dpt).apply({"params": params["head"]},
                                         [patch_map(t, grid) for t in tokens])
        logits = resize.resize_bilinear_align_corners(
            resize.resize_bilinear_align_corners(head, size), x.shape[1:3])
        return xm, tokens, head, logits

    return jax.tree.map(np.asarray, run(params, x))


@functools.lru_cache(maxsize=None)
def padded_outputs():
    """The padded batch: the evaluation input and true sizes, the encoder's tokens on it (noise in
    its padding), the head on the images' own maps (`alone_outputs`, noise around them), and
    the segmentor's eval logits with `valid_size`."""
    model, params = model_and_params()
    imgs, batch, sizes = images()
    canvas = eval_input_size(CANVAS, PATCH)
    grid = (canvas[0] // PATCH, canvas[1] // PATCH)
    key = jax.random.PRNGKey(7)
    maps = []
    for k in range(len(model.config.dpt.layers)):
        m = np.array(jax.random.normal(jax.random.fold_in(key, k),
                                       (len(sizes),) + grid + (model.config.backbone.embed_dim,)))
        for b in range(len(imgs)):
            t = alone_outputs(b)[1][k]
            g = (alone_outputs(b)[0].shape[1] // PATCH, alone_outputs(b)[0].shape[2] // PATCH)
            m[b, :g[0], :g[1]] = patch_map(t, g)[0]
        maps.append(m)
    pixel_noise = jax.random.normal(jax.random.fold_in(key, 9), (len(sizes),) + canvas + (3,))

    @jax.jit
    def run(params, x, valid_size, maps):
        xm, model_sizes = resize_eval_input(x, valid_size, PATCH)
        valid_grid = model_sizes // PATCH
        inside = (jnp.arange(canvas[0])[None, :, None] < model_sizes[:, 0, None, None]) & (
            jnp.arange(canvas[1])[None, None, :] < model_sizes[:, 1, None, None])
        noisy = jnp.where(inside[..., None], xm, pixel_noise)
        tokens = DINOv2(model.config.backbone).apply({"params": params["backbone"]}, noisy,
                                             model.config.dpt.layers, valid_grid=valid_grid)
        head = DPTHead(model.config.dpt).apply({"params": params["head"]}, maps, valid_grid=valid_grid)
        logits = model.apply({"params": params}, x, mode="eval", valid_size=valid_size)
        return xm, model_sizes, tokens, head, logits

    return jax.tree.map(np.asarray, run(params, batch, sizes, maps))


def test_canvas():
    imgs, _, sizes = images()
    model_sizes = padded_outputs()[1]
    assert [tuple(s) for s in model_sizes] == [(56, 70), (56, 84), (70, 98), (0, 0)]
    assert eval_input_size(CANVAS, PATCH) == (70, 98)
    assert all(s % PATCH for s in np.asarray(sizes[:3]).ravel())


def test_eval_input_resize():
    xm, model_sizes = padded_outputs()[:2]
    for b in range(3):
        ref = alone_outputs(b)[0][0]
        h, w = model_sizes[b]
        assert ref.shape[:2] == (h, w)
        assert scaled_err(xm[b, :h, :w], ref) < ATOL, b
        assert not xm[b, h:].any() and not xm[b, :, w:].any()
    assert not xm[3].any()


def test_dinov2_tokens_padded():
    """True tokens (class token and the image's grid) equal the image alone's; the padded patch
    tokens are returned as 0."""
    model, _ = model_and_params()
    _, model_sizes, tokens, _, _ = padded_outputs()
    grid = (70 // PATCH, 98 // PATCH)
    worst = 0.0
    for b in range(3):
        gh, gw = model_sizes[b] // PATCH
        for k, t in enumerate(tokens):
            ref = alone_outputs(b)[1][k][0]
            got = t[b]
            assert got.shape == (1 + grid[0] * grid[1], model.config.backbone.embed_dim)
            cls, patches = got[0], got[1:].reshape(grid + (-1,))
            err = max(scaled_err(cls, ref[0]),
                      scaled_err(patches[:gh, :gw].reshape(gh * gw, -1), ref[1:]))
            assert err < ATOL, (b, k, err)
            worst = max(worst, err)
            assert not patches[gh:].any() and not patches[:, gw:].any()
    assert np.isfinite(np.asarray(tokens)).all()
    print(f"worst DINOv2 token error {worst:.2e}")


def test_dpt_head_padded():
    _, model_sizes, _, head, _ = padded_outputs()
    worst = 0.0
    for b in range(3):
        ref = alone_outputs(b)[2][0]
        h, w = HEAD_SCALE * (model_sizes[b] // PATCH)
        assert ref.shape[:2] == (h, w)
        err = scaled_err(head[b, :h, :w], ref)
        assert err < ATOL, (b, err)
        worst = max(worst, err)
        assert not head[b, h:].any() and not head[b, :, w:].any()
    assert not head[3].any()
    print(f"worst DPTHead error {worst:.2e}")


def test_segmentor_eval_padded():
    """The segmentor's eval with `valid_size`: each image's logits equal its evaluation alone; 0 outside the
    true size and in the filler slot."""
    imgs, _, _ = images()
    logits = padded_outputs()[4]
    assert logits.shape == (4,) + CANVAS + (EVAL_META["nclass"],)
    worst = 0.0
    for b, img in enumerate(imgs):
        h, w = img.shape[:2]
        err = scaled_err(logits[b, :h, :w], alone_outputs(b)[3][0])
        assert err < ATOL, (b, err)
        worst = max(worst, err)
        assert not logits[b, h:].any() and not logits[b, :, w:].any()
    assert not logits[3].any()
    print(f"worst padded eval error {worst:.2e}")


def test_unimatch_evaluate_parity():
    """The padded batch and each image alone against the logits of UniMatch V2's `evaluate`."""
    logits = padded_outputs()[4]
    for i, (h, w) in enumerate(EVAL_META["sizes"]):
        ref = nhwc(EVAL[f"image{i}_logits"])[0]
        assert ref.shape == (h, w, EVAL_META["nclass"])
        padded, alone = rel_err(logits[i, :h, :w], ref), rel_err(alone_outputs(i)[3][0], ref)
        print(f"image {i} ({h}x{w}): rel err padded {padded:.2e}, alone {alone:.2e}")
        assert padded < RTOL and alone < RTOL, (i, padded, alone)


# -- the building blocks against their static-shape versions -------------------------------------


def test_align_corners_matrix():
    """Per-sample weights equal the static matrix of the true sizes, zero-padded."""
    pairs = [(5, 9), (9, 5), (1, 4), (4, 1), (7, 7), (3, 2), (37, 61)]
    in_size, out_size = np.array(pairs).T
    m = np.asarray(resize.align_corners_matrix(jnp.asarray(in_size), jnp.asarray(out_size), 40, 64))
    for (i, o), mb in zip(pairs, m):
        np.testing.assert_array_equal(mb[:o, :i], resize.bilinear_align_corners_matrix(i, o))
        assert not mb[o:].any() and not mb[:, i:].any()
    host = resize.align_corners_matrix(in_size, out_size, 40, 64, xp=np)
    np.testing.assert_array_equal(host, m)


@pytest.mark.parametrize("offset", [None, 0.1])
def test_bicubic_matrix_valid(offset):
    side, pad = 6, 13
    n = np.arange(pad + 1)
    m = np.asarray(resize.bicubic_matrix_valid(jnp.asarray(n), side, pad, offset))
    assert not m[0].any()
    for g in range(1, pad + 1):
        factor = None if offset is None else (g + offset) / side
        np.testing.assert_array_equal(m[g, :g], resize.bicubic_matrix(side, g, factor))
        assert not m[g, g:].any()


def test_valid_resizes_at_full_size():
    """True sizes = the whole input and output: the static-shape resizes."""
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 7, 3))
    full = jnp.array([[5, 7], [5, 7]])
    out = jnp.array([[9, 4], [9, 4]])

    @jax.jit
    def both(x, full, out):
        return (resize.resize_bilinear_align_corners_valid(x, (9, 4), full, out),
                resize.resize_bilinear_align_corners(x, (9, 4)),
                resize.resize_bicubic_valid(x[:1], (9, 4), out, 0.1),
                resize.resize_bicubic(x[:1], (9, 4), ((9 + 0.1) / 5, (4 + 0.1) / 7)))

    bilinear, bilinear_ref, bicubic, bicubic_ref = both(x, full, out)
    np.testing.assert_allclose(bilinear, bilinear_ref, atol=1e-6)
    np.testing.assert_allclose(bicubic, jnp.broadcast_to(bicubic_ref, (2, 9, 4, 3)), atol=1e-6)


@pytest.mark.parametrize("kind", ["dinov2", "transformers"])
def test_pos_embed_valid(kind):
    """Per-image embeddings equal `interpolate_pos_embed` of each grid: the stored grid (kept, for
    'dinov2'), the stored rows on a non-square grid, up- and down-sampling, an empty slot."""
    cfg = DINOv2Config(embed_dim=8, depth=1, num_heads=1, pos_grid=4, pos_interpolation=kind)
    pos = jax.random.normal(jax.random.PRNGKey(0), (1, 17, 8))
    grids = np.array([[4, 4], [4, 6], [2, 3], [5, 6], [0, 0]], np.int32)
    shape = (5, 6)
    got = np.asarray(jax.jit(interpolate_pos_embed_valid, static_argnums=(2, 3))(
        pos, jnp.asarray(grids), shape, cfg))
    assert got.shape == (5, 1 + 30, 8)
    for b, (gh, gw) in enumerate(grids[:4]):
        ref = np.asarray(interpolate_pos_embed(pos, (PATCH * gh, PATCH * gw), cfg))[0]
        np.testing.assert_allclose(got[b, 0], ref[0], atol=0)
        patches = got[b, 1:].reshape(shape + (8,))
        np.testing.assert_allclose(patches[:gh, :gw].reshape(gh * gw, 8), ref[1:], atol=1e-6)
        assert not patches[gh:].any() and not patches[:, gw:].any()
    if kind == "dinov2":  # the stored grid is kept exactly; its neighbours are resampled
        np.testing.assert_array_equal(got[0, 1:].reshape(shape + (8,))[:4, :4],
                                      np.asarray(pos[0, 1:]).reshape(4, 4, 8))
    assert not got[4, 1:].any()


def test_eval_input_sizes():
    """In integers as UniMatch V2 computes it in floats: int(s / p + 0.5) * p."""
    s = np.arange(0, 3000)
    for p in (14, 16):
        got = np.asarray(eval_input_sizes(jnp.asarray(np.stack([s, s[::-1]], 1)), p))
        want = np.array([[int(a / p + 0.5) * p, int(b / p + 0.5) * p] for a, b in
                         zip(s, s[::-1])])
        np.testing.assert_array_equal(got, want)
    assert eval_input_size((61, 75)) == (56, 70)


def test_bad_inputs():
    model, params = model_and_params()
    x = jax.ShapeDtypeStruct((2, 28, 42, 3), jnp.float32)
    encoder = DINOv2(model.config.backbone)
    for grid, match in ((jnp.ones((2, 3), jnp.int32), r"\(2, 3\)"),
                        (jnp.ones((2, 2), jnp.float32), "float32")):
        with pytest.raises(ValueError, match=r"DINOv2: valid_grid must be \(2, 2\) int.*" + match):
            jax.eval_shape(lambda x: encoder.apply({"params": params["backbone"]}, x,
                                                   valid_grid=grid), x)
    maps = [jax.ShapeDtypeStruct((2, 2, 3, model.config.backbone.embed_dim), jnp.float32)] * 4
    with pytest.raises(ValueError, match=r"DPTHead: valid_grid must be \(2, 2\) int"):
        jax.eval_shape(lambda m: DPTHead(model.config.dpt).apply(
            {"params": params["head"]}, m, valid_grid=jnp.ones((3, 2), jnp.int32)), maps)
    with pytest.raises(ValueError, match=r"^valid_size must be \(2, 2\) int"):
        jax.eval_shape(lambda x: model.apply({"params": params}, x, mode="eval",
                                             valid_size=jnp.ones((2,), jnp.int32)), x)
    with pytest.raises(ValueError, match=r"feature_scale .* is a training input, got mode='eval'"):
        jax.eval_shape(lambda x: model.apply({"params": params}, x, mode="eval",
                                             feature_scale=jnp.ones((2, 32)),
                                             valid_size=jnp.full((2, 2), 20, jnp.int32)), x)
    with pytest.raises(ValueError, match=r"valid_size .* is an \"eval\" mode input"):
        jax.eval_shape(lambda x: model.apply({"params": params}, x, mode="teacher",
                                             valid_size=jnp.full((2, 2), 20, jnp.int32)), x)
