"""Size-bucketed evaluation (evaluation.bucketing, the model's `valid_size`) against the per-size
program the release's evaluation corresponds to: every image alone at its own size.

The model is the tiny official-architecture reference (tests/data/allspark_tiny.npz: 4 stages with
spatial-reduction ratios 8, 4, 2, 1, an AllSpark module, 5 classes, the release's weights and
non-trivial BatchNorm statistics). Compiled programs are shared through module-scoped fixtures;
the session's persistent compilation cache is off here, as the tests count XLA compilations.
"""
import concurrent.futures
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import release_loops
from allspark_jax.benchmark.timing import CompileCounter
from allspark_jax.evaluation import bucketing, evaluator, metrics, predictor as predictor_lib
from allspark_jax.models.mit import OverlapPatchEmbed, token_grid, token_grid_sizes
from allspark_jax.models.resize import resize_bilinear, resize_bilinear_valid
from reference_model import reference

pytestmark = pytest.mark.usefixtures("no_compilation_cache")

BUCKETS = (64, 96)
BATCH = 4
CROP = 32  # sliding window / center crop


def _sizes():
    """30 (height, width) pairs, sides 33..96: the extremes, then random ones (odd and even,
    portrait and landscape), spread over both buckets."""
    fixed = [(33, 33), (96, 96), (33, 96), (96, 33), (64, 64), (65, 64), (64, 65), (34, 95)]
    rng = np.random.default_rng(0)
    out = list(fixed)
    while len(out) < 30:
        hw = tuple(int(v) for v in rng.integers(33, 97, size=2))
        if hw not in out:
            out.append(hw)
    return out


SIZES = _sizes()


def image(h, w, seed):
    return np.random.default_rng(seed).normal(size=(h, w, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def ref():
    return reference()


@pytest.fixture(scope="module")
def runs(ref):
    """Every image of SIZES through the bucketed program (BATCH images of mixed sizes per call) and
    through the per-size program; the compilations of the bucketed pass are counted."""
    images = [image(h, w, seed) for seed, (h, w) in enumerate(SIZES)]
    logits_fn = bucketing.make_logits_fn(ref.model)
    groups = {}
    for i, im in enumerate(images):
        groups.setdefault(bucketing.choose_bucket(im.shape, BUCKETS), []).append(i)
    bucketed = [None] * len(images)
    before = bucketing.compiled_programs()
    with CompileCounter() as counter:
        for bucket, idx in groups.items():
            for k in range(0, len(idx), BATCH):
                chunk = idx[k:k + BATCH]
                batch, sizes = bucketing.pad_batch([images[i] for i in chunk], bucket, BATCH)
                out = np.asarray(logits_fn(ref.variables, batch, sizes))
                for i, full, region in zip(chunk, out, bucketing.unpad(out, sizes)):
                    bucketed[i] = (region, full)
    compiled = bucketing.compiled_programs() - before

    # The per-size programs: `model.apply(variables, image[None], mode="eval")`, one per size, the
    # test's slow part. Traced here, compiled in threads (XLA releases the GIL) with cheaper
    # XLA:CPU code generation (LLVM level 0, no fusion emitters): the same XLA program, compiled
    # about 5x faster; its logits differ from the default build's by float32 round-off (~4e-7).
    def forward(v, x):
        return ref.model.apply(v, x, mode="eval")

    lowered = [jax.jit(forward).lower(ref.variables, im[None]) for im in images]
    options = ({"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
               if jax.default_backend() == "cpu" else None)
    with concurrent.futures.ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        programs = list(pool.map(lambda lo: lo.compile(options), lowered))
    alone = [np.asarray(p(ref.variables, im[None]))[0] for p, im in zip(programs, images)]
    return dict(bucketed=bucketed, alone=alone, groups=groups, compiled=compiled,
                backend_compiles=counter.count)


def test_bucketed_logits_equal_each_image_alone(runs):
    worst, mismatches = 0.0, 0
    for (h, w), (region, full), alone in zip(SIZES, runs["bucketed"], runs["alone"]):
        assert region.shape == alone.shape == (h, w, 5)
        rel = np.linalg.norm(region - alone) / np.linalg.norm(alone)
        worst = max(worst, rel)
        assert rel <= 1e-5, ((h, w), rel)
        # logits beyond the true size are exactly 0
        assert not full[h:].any() and not full[:, w:].any(), (h, w)
        differ = region.argmax(-1) != alone.argmax(-1)
        if differ.any():  # allowed only where the reference's two best classes tie
            top2 = np.sort(alone[differ], axis=-1)[:, -2:]
            assert np.all(top2[:, 1] - top2[:, 0] <= 1e-5 * np.abs(alone).max()), (h, w)
            mismatches += int(differ.sum())
    print(f"\n{len(SIZES)} sizes: worst per-image relative error {worst:.2e}, "
          f"{mismatches} argmax differences (ties)")
    assert len(set(SIZES)) >= 30
    assert {h % 2 for h, _ in SIZES} == {0, 1} and {w % 2 for _, w in SIZES} == {0, 1}
    assert any(h > w for h, w in SIZES) and any(h < w for h, w in SIZES)


def test_one_compilation_per_bucket(runs):
    # 30 distinct sizes in two buckets: two programs (cache entries of the jitted function), two
    # XLA compilations (monitoring events), whatever the sizes.
    assert sorted(runs["groups"]) == [(64, 64), (96, 96)]
    assert runs["compiled"] == len(runs["groups"])
    assert runs["backend_compiles"] == len(runs["groups"])


def test_stage1_patch_embedding_of_the_true_grid_ignores_zero_padding(ref):
    """The 7x7 / stride 4 / padding 3 convolution pads with zeros: an image zero-padded at the
    bottom / right gives, on its own token grid, exactly the embedding of the image alone."""
    cfg = ref.backbone
    embed = OverlapPatchEmbed(cfg.embed_dims[0], cfg.patch_kernels[0], cfg.patch_strides[0])
    params = {"params": ref.variables["params"]["backbone"]["patch_embed1"]}
    apply = jax.jit(embed.apply)
    for seed, (h, w) in enumerate([(37, 50), (64, 33), (93, 96)]):
        x = image(h, w, seed)
        padded = np.zeros((1, 96, 96, 3), np.float32)
        padded[0, :h, :w] = x
        gh, gw = token_grid(h, cfg)[0], token_grid(w, cfg)[0]
        alone = np.asarray(apply(params, x[None]))
        assert alone.shape[1:3] == (gh, gw)
        got = np.asarray(apply(params, padded))[:, :gh, :gw]
        np.testing.assert_allclose(got, alone, rtol=1e-6, atol=1e-6)


def test_token_grid_sizes_match_token_grid(ref):
    sides = np.arange(0, 1100)
    grids = jax.jit(lambda s: token_grid_sizes(s, ref.backbone))(np.stack([sides, sides[::-1]], 1))
    for stage, g in enumerate(grids):
        want = [token_grid(int(s), ref.backbone)[stage] for s in sides]  # 0 gives 0
        assert np.asarray(g)[:, 0].tolist() == want and np.asarray(g)[::-1, 1].tolist() == want


def test_resize_by_matrices_equals_resize_bilinear():
    rng = np.random.default_rng(1)
    pairs = [((5, 7), (17, 29)), ((16, 16), (64, 64)), ((9, 4), (3, 2)), ((1, 1), (5, 3)),
             ((7, 7), (7, 7))]
    x = np.full((len(pairs), 20, 30, 4), 1e3, np.float32)  # padding must never be read
    alone = []
    for b, ((hi, wi), (ho, wo)) in enumerate(pairs):
        x[b, :hi, :wi] = rng.normal(size=(hi, wi, 4))
        alone.append(np.asarray(resize_bilinear(jnp.asarray(x[b:b + 1, :hi, :wi]), (ho, wo)))[0])
    out = np.asarray(jax.jit(resize_bilinear_valid, static_argnums=1)(
        x, (70, 70), np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])))
    for b, ((_, _), (ho, wo)) in enumerate(pairs):
        np.testing.assert_allclose(out[b, :ho, :wo], alone[b], rtol=0, atol=1e-6)
        assert not out[b, ho:].any() and not out[b, :, wo:].any()
    # full true sizes: the same function as resize_bilinear
    full = np.asarray(resize_bilinear_valid(jnp.asarray(x[:1]), (45, 61), np.array([[20, 30]]),
                                            np.array([[45, 61]])))
    np.testing.assert_allclose(full, resize_bilinear(jnp.asarray(x[:1]), (45, 61)), rtol=1e-6,
                               atol=1e-3)


@pytest.fixture(scope="module")
def crop_programs(ref):
    forward = jax.jit(lambda v, x: ref.model.apply(v, x, mode="eval"))
    return bucketing.make_logits_fn(ref.model), lambda x: np.asarray(forward(ref.variables, x))


def test_sliding_window_equals_the_release_loop(ref, crop_programs):
    """53 x 20 at crop 32 (stride 21): 3 clipped windows of 32, 32 and 11 rows, all 20 columns wide.
    The 11-row window has a 3-row stage-1 grid, smaller than its reduction ratio 8: no keys. Run
    as one call of 4 windows (padded with an empty one)."""
    logits_fn, forward = crop_programs
    x = image(53, 20, seed=7)
    want = release_loops.sliding_window(forward, x.transpose(2, 0, 1)[None], CROP, 5)[0]
    want = want.transpose(1, 2, 0)
    windows, sizes, offsets = bucketing.window_batch(x, CROP)
    assert sizes.tolist() == [[32, 20], [32, 20], [11, 20]]
    got = np.asarray(bucketing.sliding_window_probs(logits_fn, ref.variables, x, CROP, BATCH))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # on a larger canvas (a bucket shared by many image sizes): the same sums at the top-left
    canvas = np.asarray(bucketing.sliding_window_probs(logits_fn, ref.variables, x, CROP, BATCH,
                                                       canvas=(64, 64)))
    np.testing.assert_allclose(canvas[:53, :20], want, rtol=1e-5, atol=1e-5)
    assert not canvas[53:].any() and not canvas[:, 20:].any()


def test_center_crop_equals_the_release(ref, crop_programs):
    """(40, 50) gives a full 32 x 32 crop; (20, 45) a 6 x 32 one (negative start: the last 6
    rows), padded into the same 32 x 32 program."""
    logits_fn, forward = crop_programs
    images = [image(40, 50, seed=8), image(20, 45, seed=9)]
    crops = [bucketing.center_crop(x, CROP) for x in images]
    assert [c.shape[:2] for c in crops] == [(32, 32), (6, 32)]
    batch, sizes = bucketing.pad_batch(crops, CROP, BATCH)
    preds = bucketing.unpad(np.asarray(logits_fn(ref.variables, batch, sizes)).argmax(-1), sizes)
    for x, pred in zip(images, preds):
        mask = np.zeros(x.shape[:2], np.int32)
        want, _ = release_loops.center_crop(forward, x.transpose(2, 0, 1)[None], mask[None], CROP)
        np.testing.assert_array_equal(pred, want[0])


def test_empty_slots_are_zero_and_do_not_touch_the_others(ref, crop_programs):
    logits_fn, _ = crop_programs
    x = image(30, 25, seed=10)
    batch, sizes = bucketing.pad_batch([x], CROP, BATCH)
    assert sizes.tolist() == [[30, 25], [0, 0], [0, 0], [0, 0]]
    out = np.asarray(logits_fn(ref.variables, batch, sizes))
    assert np.isfinite(out).all() and not out[1:].any()
    batch[1:] = 1e3  # garbage in the empty slots changes nothing
    np.testing.assert_array_equal(np.asarray(logits_fn(ref.variables, batch, sizes))[0], out[0])


def test_window_geometry():
    assert bucketing.window_starts(1, 32) == [0] and bucketing.window_starts(31, 30) == [0, 20]
    x = image(42, 53, seed=11)
    windows, sizes, offsets = bucketing.window_batch(x, CROP, num_windows=8)
    assert offsets.tolist()[:6] == [[0, 0], [0, 21], [0, 42], [21, 0], [21, 21], [21, 42]]
    assert sizes.tolist()[6:] == [[0, 0], [0, 0]] and not windows[6:].any()
    for win, (h, w), (r, c) in zip(windows[:6], sizes, offsets):
        np.testing.assert_array_equal(win[:h, :w], x[r:r + h, c:c + w])
        assert not win[h:].any() and not win[:, w:].any()
    assert bucketing.num_windows((42, 53), CROP) == 6
    assert bucketing.num_windows((1024, 2048), 801) == 8


def test_bad_input_is_a_clear_error(ref, crop_programs):
    logits_fn, _ = crop_programs
    assert bucketing.choose_bucket((500, 375), (512, 640)) == (512, 512)
    assert bucketing.choose_bucket((375, 600), [512, (512, 640), 640]) == (512, 640)
    with pytest.raises(ValueError, match=r"600x480 .* fits no bucket of 512x512"):
        bucketing.choose_bucket((600, 480), (512,))
    with pytest.raises(ValueError, match="image 1 of 40x20 does not fit the 32x32 bucket"):
        bucketing.pad_batch([image(8, 8, 0), image(40, 20, 0)], CROP)
    with pytest.raises(ValueError, match="3 images for a batch of 2"):
        bucketing.pad_batch([image(8, 8, 0)] * 3, CROP, 2)
    batch, sizes = bucketing.pad_batch([image(8, 8, 0)], CROP, BATCH)
    with pytest.raises(ValueError, match=r"sizes must be \(4, 2\)"):
        logits_fn(ref.variables, batch, sizes[:3])
    sizes[2] = 33, 1
    with pytest.raises(ValueError, match=r"\[\[33, 1\]\] \(images \[2\]\) do not fit the 32x32"):
        logits_fn(ref.variables, batch, sizes)
    with pytest.raises(ValueError, match="has 6 windows of 32, more than num_windows=4"):
        bucketing.window_batch(image(42, 53, 0), CROP, num_windows=4)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((1, 32, 32, 5), jnp.float32)
    with pytest.raises(ValueError, match='"eval" mode input'):
        jax.eval_shape(lambda x, t: ref.model.apply(
            ref.variables, x, mode="train", teacher_logits=t, valid_size=jnp.ones((2, 2), int),
            mutable=["batch_stats", "memory"], rngs={"dropout": jax.random.key(0)}), x, t)
    with pytest.raises(ValueError, match=r"valid_size must be \(2, 2\) int"):
        jax.eval_shape(lambda x: ref.model.apply(ref.variables, x, valid_size=jnp.ones((3, 2),
                                                                                       int)), x)


def test_bucketed_evaluation_gives_each_image_its_alone_miou(ref, runs):
    """The evaluator (Predictor, batches of mixed sizes) on the 30 images with random masks: the
    same counts and mIoU as the per-size predictions."""
    rng = np.random.default_rng(3)
    masks = [rng.integers(0, 5, size=(h, w)) for h, w in SIZES]
    for m in masks:
        m[:2] = 255
    alone = sum(np.stack(metrics.intersection_and_union(a.argmax(-1), m, 5))
                for a, m in zip(runs["alone"], masks))
    examples = [{"image": image(h, w, seed), "mask": m}
                for seed, ((h, w), m) in enumerate(zip(SIZES, masks))]
    predictor = predictor_lib.Predictor(ref.model, "original", buckets=BUCKETS, batch_size=BATCH)
    result = evaluator.evaluate(predictor, ref.variables, examples, 5)
    assert result["num_images"] == len(SIZES)
    assert result["miou"] == metrics.miou(alone[0], alone[1])[0]


def test_200_images_in_100_sizes_compile_one_program_per_bucket(ref):
    """A validation set of 200 images in 100 distinct sizes (two of each, sides 33..96, both
    buckets, batches of 3 so that no earlier test compiled these programs): exactly one XLA
    compilation per bucket through the whole evaluation."""
    rng = np.random.default_rng(4)
    sizes = set()
    while len(sizes) < 100:
        sizes.add(tuple(int(v) for v in rng.integers(33, 97, size=2)))
    examples = [{"image": image(h, w, i), "mask": np.zeros((h, w), np.int32)}
                for i, (h, w) in enumerate(sorted(sizes) * 2)]
    predictor = predictor_lib.Predictor(ref.model, "original", buckets=BUCKETS, batch_size=3)
    with CompileCounter() as counter:
        result = evaluator.evaluate(predictor, ref.variables, examples, 5)
    assert result["num_images"] == 200
    buckets = {bucketing.choose_bucket(ex["image"].shape, BUCKETS) for ex in examples}
    assert len(buckets) == 2 and counter.count == len(buckets)
