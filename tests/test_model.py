"""Model structure: parameter counts, token grids for any input size, batch independence, the
vectorised Semantic Memory update against a literal transcription of the release's loop, the
depthwise convolution's custom VJP against XLA's convolution."""
import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from allspark_jax import runtime
from allspark_jax.models import allspark as allspark_lib
from allspark_jax.models import mit
from allspark_jax.models.mit import MiTConfig, MixVisionTransformer, token_grid
from allspark_jax.models.segmentor import AllSparkSegmentor, ModelConfig, init_variables
from conftest import make_config
from reference_model import reference


def encoder_params(variant: str) -> float:
    enc = MixVisionTransformer(MiTConfig.preset(variant))
    shapes = jax.eval_shape(lambda: enc.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) / 1e6


# The release's variant table (~3.3M ... ~82M). For B2 and B3 its "~25M" and "~45M" are rounded
# up by 3.2% and 2.1%; the architecture (checked to 1e-7 against the release) has SegFormer's published 24.2M and
# 44.0M encoder parameters, so those two rows are checked against the published figures.
@pytest.mark.parametrize("variant,millions", [
    ("b0", 3.3), ("b1", 13.0), ("b2", 24.2), ("b3", 44.0), ("b4", 62.0), ("b5", 82.0)])
def test_encoder_parameter_counts(variant, millions):
    assert encoder_params(variant) == pytest.approx(millions, rel=0.02)


@pytest.mark.parametrize("side,expected", [(513, [129, 65, 33, 17]), (512, [128, 64, 32, 16])])
def test_token_grid_matches_spec_examples(side, expected):
    assert token_grid(side, MiTConfig.preset("b0")) == expected
    assert token_grid(801, MiTConfig.preset("b0"))[-1] == 26


TINY = ModelConfig(backbone=MiTConfig(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1),
                                      num_heads=(1, 2, 3, 4)),
                   num_classes=3, allspark_heads=2, decoder_dim=16, head_dropout=0.1,
                   attn_drop=0.1, proj_drop=0.1, allspark=True)


@pytest.mark.parametrize("hw", [(512, 512), (513, 513), (801, 801), (97, 150), (64, 33)])
def test_shapes_for_any_input(hw):
    model = AllSparkSegmentor(TINY)
    h, w = hw
    variables = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), hw, batch_size=1))
    grids = list(zip(token_grid(h, TINY.backbone), token_grid(w, TINY.backbone)))
    assert variables["memory"]["allspark"]["attn"]["kv_queue"].shape == (
        3, 32, grids[-1][0] * grids[-1][1])
    x = jax.ShapeDtypeStruct((2, h, w, 3), jnp.float32)
    out = jax.eval_shape(lambda v, x: model.apply(v, x, mode="eval"), variables, x)
    assert out.shape == (2, h, w, 3)
    feats = jax.eval_shape(lambda v, x: MixVisionTransformer(TINY.backbone).apply(
        {"params": v["params"]["backbone"]}, x), variables, x)
    assert [f.shape[1:3] for f in feats] == grids
    t = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
    train_out = jax.eval_shape(lambda v, x, t: model.apply(
        v, x, mode="train", teacher_logits=t, mutable=["batch_stats", "memory"],
        rngs={"dropout": jax.random.key(1)})[0], variables, x, t)
    assert train_out.shape == (2, h, w, 3)


@pytest.fixture(scope="module")
def tiny_ref():
    return reference()


def test_eval_result_independent_of_batch(tiny_ref):
    ref = tiny_ref
    x = np.concatenate([ref.x_l, ref.x_u])  # 4 distinct images
    apply = jax.jit(lambda x, mode: ref.model.apply(ref.variables, x, mode=mode),
                    static_argnums=1)
    alone = apply(x[:1], "eval")
    np.testing.assert_allclose(apply(x, "eval")[:1], alone, rtol=0, atol=2e-6)
    np.testing.assert_allclose(apply(x[::-1], "eval")[-1:], alone, rtol=0, atol=2e-6)
    # The release's teacher pass mixes the batch: the same image differs with other company.
    assert np.abs(apply(x, "teacher")[:1] - alone).max() > 1e-3


def test_key_groups_mix_only_their_own_images():
    """train.key_group_size g: the teacher's and the pre-warm-up student's labeled-to-unlabeled keys
    come from the g unlabeled images of the labeled image's group, nothing else."""
    module = allspark_lib.AllSpark(num_heads=2, num_classes=3, attn_drop=0.0, proj_drop=0.0)
    r = np.random.default_rng(0)
    e4 = jnp.asarray(r.normal(size=(8, 2, 3, 8)), jnp.float32)  # 4 labeled + 4 unlabeled
    t = jnp.asarray(r.normal(size=(4, 8, 12, 3)), jnp.float32)
    variables = module.init(jax.random.key(0), e4, mode="train", teacher_logits=t)

    def student(e4, g):
        return module.apply(variables, e4, mode="train", teacher_logits=t, key_group_size=g,
                            mutable=["memory"])[0][:4]

    def teacher(e4, g):
        return module.apply(variables, e4, mode="teacher", key_group_size=g)

    moved = e4.at[7].add(1.0)  # unlabeled image 3: the second group of 2
    for g, same in ((2, slice(0, 2)), (1, slice(0, 3))):
        np.testing.assert_array_equal(student(moved, g)[same], student(e4, g)[same])
        assert np.abs(student(moved, g)[3] - student(e4, g)[3]).max() > 1e-3
    assert np.abs(student(moved, None)[0] - student(e4, None)[0]).max() > 1e-3
    # The teacher: a group alone gives its images what they get in the whole batch.
    np.testing.assert_allclose(teacher(e4[4:], 2)[:2], teacher(e4[4:6], None), rtol=0, atol=1e-6)
    np.testing.assert_allclose(teacher(e4[4:], 1), module.apply(variables, e4[4:], mode="eval"),
                               rtol=0, atol=1e-6)


def test_inspection_branches_equal_the_training_students():
    """branch='unlabeled' is the training student's unlabeled half, branch='memory' its labeled
    half after the warm-up (with the memory that step read), each image alone."""
    module = allspark_lib.AllSpark(num_heads=2, num_classes=3, attn_drop=0.0, proj_drop=0.0)
    r = np.random.default_rng(1)
    e4 = jnp.asarray(r.normal(size=(6, 2, 3, 8)), jnp.float32)  # 3 labeled + 3 unlabeled
    t = jnp.asarray(r.normal(size=(3, 8, 12, 3)), jnp.float32)
    variables = module.init(jax.random.key(0), e4, mode="train", teacher_logits=t)
    out, updates = module.apply(variables, e4, mode="train", teacher_logits=t, use_memory=True,
                                mutable=["memory"])
    after = {"params": variables["params"], **updates}
    apply = lambda x, branch, v=after: module.apply(v, x, mode="eval", branch=branch)  # noqa: E731
    np.testing.assert_allclose(apply(e4[3:], "unlabeled"), out[3:], rtol=0, atol=1e-5)
    np.testing.assert_allclose(apply(e4[:3], "memory"), out[:3], rtol=0, atol=1e-5)
    np.testing.assert_allclose(apply(e4[:1], "memory"), out[:1], rtol=0, atol=1e-5)
    assert np.abs(apply(e4[:3], "labeled") - out[:3]).max() > 1e-3  # the release's inference
    with pytest.raises(ValueError, match="needs the Semantic Memory"):
        apply(e4[:3], "memory", {"params": variables["params"]})
    with pytest.raises(ValueError, match=r"memory holds 6 tokens per channel, the input gives 4"):
        apply(e4[:3, :, :2], "memory")
    with pytest.raises(ValueError, match="branch must be one of"):
        apply(e4[:3], "teacher")
    with pytest.raises(ValueError, match=r"branch='unlabeled' is an \"eval\" / \"teacher\" mode "
                                         r"choice, got mode='train'"):
        module.apply(after, e4, mode="train", teacher_logits=t, branch="unlabeled",
                     mutable=["memory"])
    # each image alone: the teacher pass through these branches is their "eval" mode
    for branch in ("unlabeled", "memory"):
        np.testing.assert_array_equal(
            module.apply(after, e4[:3], mode="teacher", branch=branch), apply(e4[:3], branch))


def release_memory_update(memory, ptr, cls, feats):
    """The release's memory update, literally: samples in order, classes present, channels in
    increasing order."""
    memory, ptr = memory.copy(), ptr.copy()
    k_classes, c, _ = memory.shape
    for b in range(cls.shape[0]):
        for k in range(k_classes):
            channels = np.nonzero(cls[b] == k)[0]
            for j, ch in enumerate(channels):
                memory[k, (ptr[k] + j) % c] = feats[b, :, ch]
            ptr[k] = (ptr[k] + len(channels)) % c
    return memory, ptr


@pytest.mark.parametrize("batch,skew", [(1, 0.0), (3, 0.0), (9, 0.9)])
def test_memory_update_matches_release_loop(batch, skew):
    """Wrap-around and same-batch collisions: with skew, most channels go to class 0, so its
    queue (C = 12 rows) is overrun several times within one batch."""
    rng = np.random.default_rng(batch)
    k_classes, c, n = 4, 12, 5
    memory = rng.normal(size=(k_classes, c, n)).astype(np.float32)
    ptr = rng.integers(0, c, size=k_classes).astype(np.int32)
    cls = rng.integers(0, k_classes, size=(batch, c))
    cls = np.where(rng.random((batch, c)) < skew, 0, cls).astype(np.int32)
    feats = rng.normal(size=(batch, n, c)).astype(np.float32)
    want_mem, want_ptr = release_memory_update(memory, ptr, cls, feats)
    got_mem, got_ptr = jax.jit(allspark_lib.update_memory)(memory, ptr, cls, feats)
    np.testing.assert_array_equal(got_ptr, want_ptr)
    np.testing.assert_array_equal(got_mem, want_mem)


def _lax_depthwise(x, kernel, bias):
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1]) + bias


@pytest.mark.parametrize("shape,k", [((2, 7, 5, 6), 3), ((1, 4, 9, 3), 5)])
def test_depthwise_conv_and_its_vjp_match_xla_convolution(shape, k):
    r = np.random.RandomState(0)
    x = jnp.asarray(r.randn(*shape), jnp.float32)
    kernel = jnp.asarray(r.randn(k, k, 1, shape[-1]), jnp.float32)
    bias = jnp.asarray(r.randn(shape[-1]), jnp.float32)
    np.testing.assert_allclose(mit.depthwise_conv(x, kernel, bias),
                               _lax_depthwise(x, kernel, bias), rtol=1e-5, atol=1e-5)
    cot = jnp.asarray(r.randn(*shape), jnp.float32)
    ours = jax.vjp(mit.depthwise_conv, x, kernel, bias)[1](cot)
    theirs = jax.vjp(_lax_depthwise, x, kernel, bias)[1](cot)
    for name, a, b in zip(("x", "kernel", "bias"), ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("hw,out", [((9, 9), (65, 65)), ((33, 21), (65, 65)),
                                    ((65, 65), (9, 9)), ((45, 61), (17, 23)), ((7, 5), (7, 11))])
def test_resize_by_taps_and_its_vjp_match_dense_resize(hw, out):
    """resize_bilinear (taps, custom VJP) against jax.image.resize's dense interpolation matrices
    (no antialiasing), up and down, and the transpose against the matrices' transposes. The dense
    products are taken in float64, so the tolerance is the taps' own float32 rounding: two passes
    of a two-tap weighted sum, at most 4 float32 ulps of the largest input (without fused
    multiply-adds; with them, about half of that)."""
    from allspark_jax.models.resize import resize_bilinear

    def matrix(n_in, n_out):  # (n_out, n_in): jax.image.resize of the one-hot rows, one axis
        eye = jnp.eye(n_in, dtype=jnp.float32)
        return np.asarray(jax.image.resize(eye, (n_out, n_in), "bilinear", antialias=False),
                          np.float64)

    r = np.random.RandomState(0)
    x = jnp.asarray(r.randn(2, *hw, 3), jnp.float32)
    mh, mw = matrix(hw[0], out[0]), matrix(hw[1], out[1])
    dense = np.einsum("oh,pw,bhwc->bopc", mh, mw, np.asarray(x, np.float64))
    rounding = 4 * np.finfo(np.float32).eps * float(jnp.abs(x).max())
    np.testing.assert_allclose(resize_bilinear(x, out), dense, rtol=1e-5, atol=rounding)
    cot = jnp.asarray(r.randn(2, *out, 3), jnp.float32)
    dense_vjp = np.einsum("oh,pw,bopc->bhwc", mh, mw, np.asarray(cot, np.float64))
    np.testing.assert_allclose(jax.vjp(lambda v: resize_bilinear(v, out), x)[1](cot)[0],
                               dense_vjp, rtol=1e-5, atol=1e-5)


def test_one_pass_batch_norm_and_its_vjp_match_the_two_pass_form():
    """batch_norm_train (one-pass shifted sums, closed-form VJP) against autodiff of the textbook
    two-pass form, on a map whose mean is far from 0, with cotangents on the statistics too."""
    from allspark_jax.models.layers import batch_norm_train

    def two_pass(x, scale, bias):
        mean = jnp.mean(x, 0)
        var = jnp.mean(jnp.square(x - mean), 0)
        return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias, mean, var

    r = np.random.RandomState(0)
    x = jnp.asarray(r.randn(3000, 6) * 0.5 + 20.0, jnp.float32)
    scale, bias = (jnp.asarray(r.randn(6), jnp.float32) for _ in range(2))
    ours, vjp_ours = jax.vjp(lambda *a: batch_norm_train(*a, 1e-5), x, scale, bias)
    theirs, vjp_theirs = jax.vjp(two_pass, x, scale, bias)
    for name, a, b in zip(("y", "mean", "var"), ours, theirs):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5, err_msg=name)
    cot = (jnp.asarray(r.randn(3000, 6), jnp.float32), jnp.asarray(r.randn(6), jnp.float32),
           jnp.asarray(r.randn(6), jnp.float32))
    for name, a, b in zip(("x", "scale", "bias"), vjp_ours(cot), vjp_theirs(cot)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("groups,dropout,offset", [(1, True, 0.3), (2, False, 0.3), (1, True, 3.0)])
def test_channel_attention_and_its_vjp_match_autodiff_of_the_chain(groups, dropout, offset):
    """channel_attention (one layout, closed-form VJP whose sums come from small matrices) against
    autodiff of the release's chain: einsum, instance norm over (J, K), softmax, dropout, einsum.
    `offset` shifts q and k so that the scores' mean is large against their spread (the VJP's
    Gram-matrix terms subtract it out)."""
    attention = allspark_lib.channel_attention
    r = np.random.RandomState(0)
    b, n, j, k = 2, 9, 8, 24
    q = jnp.asarray(r.randn(groups, b, n, j) + offset, jnp.float32)
    kk = jnp.asarray(r.randn(groups, n, k) + offset - 0.3, jnp.float32)
    v = jnp.asarray(r.randn(groups, n, k), jnp.float32)
    keep = jnp.asarray(r.rand(groups, b, j, k) > 0.2) if dropout else None

    def chain(q, kk, v):
        a = jax.nn.softmax(allspark_lib.instance_norm(jnp.einsum("gbnj,gnk->gbjk", q, kk)), -1)
        if keep is not None:
            a = jnp.where(keep, a / 0.8, 0.0)
        return jnp.einsum("gbjk,gnk->gbnj", a, v)

    ours, vjp_ours = jax.vjp(lambda *a: attention(*a, keep, 0.8), q, kk, v)
    theirs, vjp_theirs = jax.vjp(chain, q, kk, v)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    cot = jnp.asarray(r.randn(*ours.shape), jnp.float32)
    for name, a, c in zip(("q", "k", "v"), vjp_ours(cot), vjp_theirs(cot)):
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_softmax_attention_and_its_vjp_match_autodiff(dtype, tol):
    """MiT's attention core (softmax's backward sum taken over the head's channels) against
    autodiff of einsum, float32 softmax, einsum."""
    r = np.random.RandomState(0)
    q = jnp.asarray(r.randn(2, 30, 2, 8), dtype)
    k, v = (jnp.asarray(r.randn(2, 6, 2, 8), dtype) for _ in range(2))

    def chain(q, k, v):
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) * 8 ** -0.5
        a = jax.nn.softmax(s.astype(jnp.float32), -1).astype(v.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", a, v)

    ours, vjp_ours = jax.vjp(mit.softmax_attention, q, k, v)
    theirs, vjp_theirs = jax.vjp(chain, q, k, v)
    np.testing.assert_allclose(np.float32(ours), np.float32(theirs), rtol=tol, atol=tol)
    cot = jnp.asarray(r.randn(*ours.shape), dtype)
    for name, a, c in zip(("q", "k", "v"), vjp_ours(cot), vjp_theirs(cot)):
        assert a.dtype == dtype, name
        np.testing.assert_allclose(np.float32(a), np.float32(c), rtol=tol, atol=tol, err_msg=name)


def test_dropout2d_folded_into_the_classifier():
    """The head's training-mode Dropout2d, applied as a per-image scale of the classifier's kernel,
    gives the logits of nn.Dropout on the map (same module path, so the same PRNG draws) followed
    by the 1x1 classifier."""
    import flax.linen as nn
    from allspark_jax.models.head import SegFormerHead
    from allspark_jax.models.layers import Conv1x1

    class MapDropout(nn.Module):  # the unfolded form, named as in the head
        @nn.compact
        def __call__(self, x):
            x = nn.Dropout(0.5, broadcast_dims=(1, 2), deterministic=False)(x)
            return Conv1x1(3, name="linear_pred")(x)

    r = np.random.RandomState(0)
    feats = [jnp.asarray(r.randn(4, 12 // 2 ** i, 12 // 2 ** i, 4 * (i + 1)), jnp.float32)
             for i in range(4)]
    head = SegFormerHead(3, 8, 0.5)
    variables = head.init({"params": jax.random.key(1), "dropout": jax.random.key(2)}, feats,
                          train=True)

    def run(key):
        logits, state = head.apply(variables, feats, train=True, rngs={"dropout": key},
                                   mutable=["batch_stats", "intermediates"],
                                   capture_intermediates=True)
        fused = state["intermediates"]["linear_fuse"]["__call__"][0]
        want = MapDropout().apply({"params": {"linear_pred": variables["params"]["linear_pred"]}},
                                  fused, rngs={"dropout": key})
        return logits, want

    got, want = run(jax.random.key(3))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, run(jax.random.key(4))[0])  # the mask follows the key


_MEMORY_SCRIPT = """
import os
from allspark_jax import config as config_lib, runtime
# the project's XLA flags, as main.py sets them
runtime.set_xla_flags(config_lib.default_config())
import jax, jax.numpy as jnp
from allspark_jax.models import mit
from test_model import _lax_depthwise

def temp_bytes(dwconv):
    # XLA's temporaries for the gradient of 6 MiT-B5 stage-3 Mix-FFNs (Dense, depthwise, GELU, Dense)
    c, layers = 1280, 6
    def loss(ws, x):
        for w, kernel in ws:
            y = dwconv(x @ w, kernel, jnp.zeros((c,)))
            x = x + jax.nn.gelu(y, approximate=False) @ w.T
        return jnp.sum(x ** 2)
    ws = [(jnp.full((c // 4, c), 0.01), jnp.ones((3, 3, 1, c))) for _ in range(layers)]
    x = jnp.ones((2, 17, 17, c // 4))
    return jax.jit(jax.grad(loss)).lower(ws, x).compile().memory_analysis().temp_size_in_bytes

print(os.environ["XLA_FLAGS"], temp_bytes(mit.depthwise_conv), temp_bytes(_lax_depthwise))
"""


DEFAULT_XLA = ("--xla_backend_optimization_level=2", "--xla_cpu_use_fusion_emitters=true")


def test_depthwise_backward_holds_less_than_xla_convolution():
    """With the project's XLA flags (config.xla_flags, set before JAX starts, hence a subprocess)
    the custom VJP's backward holds less than XLA's own depthwise convolution (BENCHMARKS.md,
    changes 6 and 7). With XLA:CPU's default scheduler it held more (303 vs 214 MiB at 8 layers)."""
    if jax.default_backend() != "cpu":
        pytest.skip("the flags and the figures are XLA:CPU's")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # compiled as a user's run compiles: XLA's defaults, not the test session's cheaper settings
    # (tests/run_config.py), plus the project's flags
    env = {**os.environ, "XLA_FLAGS": " ".join(DEFAULT_XLA)}
    env["PYTHONPATH"] = os.pathsep.join([root, os.path.join(root, "tests")])
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT.format(root=root)], env=env,
                         capture_output=True, text=True, timeout=600, check=True).stdout.split()
    flags, ours, xla = out[:-2], int(out[-2]), int(out[-1])
    assert flags == [*DEFAULT_XLA, "--xla_cpu_enable_concurrency_optimized_scheduler=false"]
    assert ours < 0.85 * xla, (ours, xla)


def test_xla_flags_are_refused_once_jax_has_started():
    jax.devices()
    with pytest.raises(RuntimeError, match="config.xla_flags"):
        runtime.set_xla_flags(make_config())
    config = make_config()
    config.xla_flags = ""
    runtime.set_xla_flags(config)  # nothing to set: no error


def test_segformer_without_allspark():
    """ModelConfig(allspark=False): plain SegFormer, no allspark params, no memory; the stage-4 map
    reaches the head unchanged, and training needs no teacher logits."""
    from allspark_jax.models.head import SegFormerHead
    from allspark_jax.models.resize import resize_bilinear
    cfg = dataclasses.replace(TINY, allspark=False)
    model = AllSparkSegmentor(cfg)
    variables = init_variables(model, jax.random.key(0), 40)
    assert set(variables) == {"params", "batch_stats"}
    assert set(variables["params"]) == {"backbone", "head"}
    x = jax.random.normal(jax.random.key(1), (2, 40, 40, 3))
    feats = MixVisionTransformer(cfg.backbone).apply({"params": variables["params"]["backbone"]}, x)
    logits = SegFormerHead(3, 16).apply({"params": variables["params"]["head"],
                                         "batch_stats": variables["batch_stats"]["head"]}, feats)
    np.testing.assert_array_equal(model.apply(variables, x, mode="eval"),
                                  resize_bilinear(logits, (40, 40)))
    out, updates = model.apply(variables, x, mode="train", mutable=["batch_stats"],
                               rngs={"dropout": jax.random.key(2)})
    assert out.shape == (2, 40, 40, 3) and set(updates) == {"batch_stats"}
    with pytest.raises(ValueError, match="branch='unlabeled': this model has no AllSpark module"):
        model.clone(branch="unlabeled").apply(variables, x, mode="eval")
