"""Evaluation modes against literal numpy transcriptions of the release's loops, on a tiny model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import release_loops
from allspark_jax.evaluation import bucketing, evaluator, metrics, predictor as predictor_lib
from allspark_jax.models.mit import MiTConfig
from allspark_jax.models.segmentor import AllSparkSegmentor, ModelConfig

TINY = ModelConfig(backbone=MiTConfig(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1),
                                      num_heads=(1, 2, 3, 4)), num_classes=3, allspark_heads=2,
                   decoder_dim=16, head_dropout=0.1, attn_drop=0.1, proj_drop=0.1, allspark=True)
CROP = 30


@pytest.fixture(scope="module")
def model_and_vars():
    model = AllSparkSegmentor(TINY)
    # eval-mode init: the parameters evaluation uses (no memory), one cheap compilation
    variables = jax.jit(lambda r: model.init(r, jnp.zeros((1, CROP, CROP, 3)), mode="eval"))(
        jax.random.key(0))
    # make the head's BN statistics non-trivial
    variables = {"params": variables["params"], "batch_stats": jax.tree.map(
        lambda x: x + 0.1 if x.dtype == jnp.float32 else x, variables["batch_stats"])}
    return model, variables


@pytest.fixture(scope="module")
def forward(model_and_vars):
    """The model on a batch alone, at its own size: NHWC logits (the release's per-image call)."""
    model, variables = model_and_vars
    fn = jax.jit(lambda v, x: model.apply(v, x, mode="eval"))
    return lambda x: np.asarray(fn(variables, jnp.asarray(x)))


def image(h, w, seed=0):
    return np.random.default_rng(seed).normal(size=(h, w, 3)).astype(np.float32)


def test_window_starts_are_clipped_not_shifted():
    assert bucketing.window_starts(1024, 801) == [0, 534]
    assert bucketing.window_starts(2048, 801) == [0, 534, 1068, 1602]
    assert bucketing.window_starts(40, 30) == [0, 20]
    assert bucketing.window_starts(30, 30) == [0, 20]  # the second window is 10 px: release quirk


@pytest.mark.parametrize("hw", [(40, 50), (30, 30)])
def test_sliding_window_matches_the_release_loop(model_and_vars, forward, hw):
    model, variables = model_and_vars
    x = image(*hw)
    ref = release_loops.sliding_window(forward, x.transpose(2, 0, 1)[None], CROP, 3)[0]
    probs = np.asarray(bucketing.sliding_window_probs(bucketing.make_logits_fn(model), variables,
                                                      x, CROP, batch_size=2))
    np.testing.assert_allclose(probs, ref.transpose(1, 2, 0), rtol=1e-5, atol=1e-5)
    # the Predictor: windows in calls of 2 per device, summed on a 64 x 64 canvas
    predictor = predictor_lib.Predictor(model, "sliding_window", CROP, buckets=(64,),
                                        batch_size=2)
    np.testing.assert_array_equal(predictor.predict(variables, [x])[0], ref.argmax(0))


@pytest.mark.parametrize("hw", [(40, 50), (20, 40)])  # (20, 40): crop taller than the image
def test_center_crop_matches_the_release(model_and_vars, forward, hw):
    model, variables = model_and_vars
    x = image(*hw, seed=1)
    mask = np.random.default_rng(2).integers(0, 3, size=hw)
    ref_pred, ref_mask = release_loops.center_crop(forward, x.transpose(2, 0, 1)[None], mask[None],
                                                   CROP)
    predictor = predictor_lib.Predictor(model, "center_crop", CROP, batch_size=2)
    img_c, mask_c = predictor.prepare(x, mask)
    np.testing.assert_array_equal(mask_c, ref_mask[0])
    np.testing.assert_array_equal(predictor.predict(variables, [img_c])[0], ref_pred[0])
    if hw[0] < CROP:  # negative start slices from the end, as Python / PyTorch slicing does
        assert img_c.shape[:2] == (5, CROP)


def test_original_is_the_whole_image_alone(model_and_vars, forward):
    model, variables = model_and_vars
    x = image(20, 30, seed=3)
    pred = predictor_lib.Predictor(model, "original", buckets=(32,)).predict(variables, [x])[0]
    np.testing.assert_array_equal(pred, forward(x[None])[0].argmax(-1))


def test_counts_match_the_release_transcription():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 4, size=(17, 23))
    target = rng.integers(0, 4, size=(17, 23))
    target[rng.random((17, 23)) < 0.2] = 255
    for a, b in zip(metrics.intersection_and_union(pred, target, 4),
                    release_loops.intersection_and_union(pred, target, 4)):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_evaluate_sums_over_images_of_many_sizes(model_and_vars, forward):
    model, variables = model_and_vars
    rng = np.random.default_rng(5)
    examples, inter, union = [], 0, 0
    for i, hw in enumerate([(30, 30), (20, 10), (30, 30), (10, 30)]):
        x = image(*hw, seed=10 + i)
        mask = rng.integers(0, 3, size=hw)
        mask[:2] = 255
        examples.append({"image": x, "mask": mask})
        ii, uu, _ = metrics.intersection_and_union(forward(x[None])[0].argmax(-1), mask, 3)
        inter, union = inter + ii, union + uu
    result = evaluator.evaluate(predictor_lib.Predictor(model, "original", buckets=(32,),
                                                        batch_size=3), variables, iter(examples), 3,
                               class_names=["a", "b", "c"], num_images=4)
    expected, iou = metrics.miou(inter, union)
    assert result["miou"] == pytest.approx(expected)
    assert result["iou"] == pytest.approx(dict(zip("abc", iou)))
    assert result["num_images"] == 4 and result["mode"] == "original"
    assert "mIoU" in evaluator.format_iou_table(result)


def test_bad_mode_is_a_clear_error(model_and_vars):
    model, _ = model_and_vars
    with pytest.raises(ValueError, match="config.eval.mode"):
        predictor_lib.Predictor(model, "tiled", CROP)
    with pytest.raises(ValueError, match="needs a crop size"):
        predictor_lib.Predictor(model, "sliding_window", None)
