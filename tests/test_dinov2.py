"""DINOv2 encoder, UniMatch V2's DPT head and their weight layouts against recorded numbers.

The data was written by tests/data/record_dinov2.py with torch and transformers (small perturbed
models, float32, eval mode, NCHW): UniMatch V2's own DINOv2 / DPT code (dpt_tiny.pth,
dpt_tiny_swiglu.pth, dpt_tiny.npz) and transformers' Dinov2Model (hf_dinov2_tiny*/). Every recorded
input needs the position embeddings interpolated except `stored` (the stored grid, square input).
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from allspark_jax.weights import pth_reader as pth
from allspark_jax.errors import WeightImportError
from allspark_jax.models import resize as resample
from allspark_jax.models.dinov2 import DINOv2, DINOv2Config, interpolate_pos_embed
from allspark_jax.models.dpt import DPTConfig
from allspark_jax.models.layers import complementary_dropout_scale
from allspark_jax.models.segmentor import dpt_model
from allspark_jax.tools import verify_dpt
from allspark_jax.weights import dinov2 as weights
from reference_model import DATA, nhwc, rel_err

RTOL = 2e-6  # per tensor ||out - ref|| / ||ref||
REC = np.load(os.path.join(DATA, "dpt_tiny.npz"))
META = json.loads(str(REC["meta_json"]))
DPT_CASES = [(m, k[len(m) + 1:-2]) for m in META["models"] for k in REC.files
             if k.startswith(m + "_") and k.endswith("_x") and "_swiglu_" not in k[len(m):]]
HF_DIRS = ("hf_dinov2_tiny", "hf_dinov2_tiny_swiglu")
HF_CASES = ("rect", "up", "masked")


def unimatch_model(name):
    """The recorded UniMatch V2 model (`dpt_model`; configs from the recording's meta)."""
    return verify_dpt.recorded_model(META, name)


def template(model):
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 3)))["params"]


_STATES = {}


def unimatch_state(name):
    if name not in _STATES:
        _STATES[name] = pth.load_pth(os.path.join(DATA, f"{name}.pth"))
    return _STATES[name]


def unimatch_params(name):
    model = unimatch_model(name)
    return model, weights.dpt_from_state_dict(unimatch_state(name), template(model),
                                              source=f"{name}.pth")


def hf_checkpoint(directory):
    path = os.path.join(DATA, directory)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    state = safetensors.numpy.load_file(os.path.join(path, "model.safetensors"))
    return config, state, np.load(os.path.join(path, "outputs.npz"))


def encoder_template(config):
    return jax.eval_shape(DINOv2(config).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 28, 28, config.in_channels)))["params"]


# -- UniMatch V2's code ------------------------------------------------------------------------


@pytest.mark.parametrize("name,case", DPT_CASES)
def test_unimatch_parity(name, case):
    """Intermediate layers (normed, class token dropped, as its DPT reads them) and logits of
    UniMatch V2's DPT; `compdrop` is its complementary-dropout forward with the drawn mask."""
    model, params = unimatch_params(name)
    x = nhwc(REC[f"{name}_{case}_x"])
    scale = (jnp.asarray(REC[f"{name}_compdrop_mask"]) if case == "compdrop" else None)

    @jax.jit
    def forward(params, x, scale):
        tokens = DINOv2(model.config.backbone).apply({"params": params["backbone"]}, x,
                                                     model.config.dpt.layers)
        # "train" mode: UniMatch V2's training forward (its DPT has no dropout but comp_drop).
        return tokens, model.apply({"params": params}, x, mode="train", feature_scale=scale)

    tokens, logits = forward(params, x, scale)
    if case != "compdrop":  # the recording has no layers for the dropout forward
        for k, t in enumerate(tokens):
            assert rel_err(t[:, 1:], REC[f"{name}_{case}_layer{k}"]) < RTOL, (k, case)
    ref = nhwc(REC[f"{name}_{case}_logits"])
    assert logits.shape == ref.shape
    assert rel_err(logits, ref) < RTOL


def test_recorded_cases_interpolate():
    """The recorded inputs exercise the interpolation: every case but `stored` has another grid
    than the stored one or a non-square input (so the embeddings are resampled)."""
    seen = set()
    for name, case in DPT_CASES:
        grid = META["models"][name]["encoder"]["img_size"] // 14
        h, w = REC[f"{name}_{case}_x"].shape[2:]
        resampled = (h // 14) * (w // 14) != grid ** 2 or h != w
        assert resampled == (case != "stored"), (name, case)
        if resampled:
            seen.add("down" if h // 14 < grid else "up")
    assert seen == {"down", "up"}


def test_position_interpolation_modes_differ():
    """'dinov2' samples with scale side / (h + 0.1), 'transformers' with side / h: different
    numbers on the same grid; both keep the stored embeddings on a square stored-size input."""
    cfg = DINOv2Config(embed_dim=8, depth=1, num_heads=1, pos_grid=4)
    pos = jax.random.normal(jax.random.PRNGKey(0), (1, 17, 8))
    a = interpolate_pos_embed(pos, (70, 98), cfg)
    b = interpolate_pos_embed(pos, (70, 98), DINOv2Config(**{**cfg.__dict__,
                                                            "pos_interpolation": "transformers"}))
    assert a.shape == b.shape == (1, 36, 8)
    assert np.abs(np.asarray(a - b)).max() > 1e-3
    np.testing.assert_array_equal(interpolate_pos_embed(pos, (56, 56), cfg), pos)
    np.testing.assert_array_equal(a[:, 0], pos[:, 0])


def test_resample_gradient_is_the_transpose():
    """The taps' custom VJP equals the gradient of the dense matrix products."""
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 7, 3))
    g = jax.random.normal(jax.random.PRNGKey(2), (2, 9, 4, 3))
    for fn, mats in ((lambda v: resample.resize_bicubic(v, (9, 4), (1.82, 0.59)),
                      (resample.bicubic_matrix(5, 9, 1.82), resample.bicubic_matrix(7, 4, 0.59))),
                     (lambda v: resample.resize_bilinear_align_corners(v, (9, 4)),
                      (resample.bilinear_align_corners_matrix(5, 9),
                       resample.bilinear_align_corners_matrix(7, 4)))):
        dense = lambda v: jnp.einsum("oh,bhwc,pw->bopc", mats[0], v, mats[1],  # noqa: E731
                                     precision=jax.lax.Precision.HIGHEST)
        np.testing.assert_allclose(fn(x), dense(x), atol=1e-5)
        got = jax.vjp(fn, x)[1](g)[0]
        want = jax.vjp(dense, x)[1](g)[0]
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_complementary_dropout_scale():
    s = np.asarray(complementary_dropout_scale(jax.random.PRNGKey(3), 8, 64))
    first, second = s[:4], s[4:]
    kept = np.all(first == 1.0, axis=1)
    assert kept.sum() == 2 and np.all(second[kept] == 1.0)  # int(4 * 0.5) pairs keep everything
    assert set(np.unique(first[~kept])) == {0.0, 2.0}
    np.testing.assert_array_equal(first[~kept] + second[~kept], 2.0)  # complementary
    with pytest.raises(ValueError, match="even batch"):
        complementary_dropout_scale(jax.random.PRNGKey(0), 3, 4)


# -- transformers' Dinov2Model -----------------------------------------------------------------


@pytest.mark.parametrize("directory", HF_DIRS)
def test_transformers_parity(directory):
    """Import of the transformers checkpoint; last_hidden_state and every layer's hidden state
    (class token included) on each recorded input, with and without masked patches."""
    config_json, state, out = hf_checkpoint(directory)
    config = weights.config_from_transformers(config_json)
    assert config.ffn == ("swiglu" if "swiglu" in directory else "mlp")
    params = weights.encoder_from_state_dict(state, encoder_template(config),
                                             layout="transformers", source=directory)
    model = DINOv2(config)
    layers = tuple(range(config.depth))

    @jax.jit
    def forward(x, masks):
        hidden = model.apply({"params": params}, x, layers, norm=False, masks=masks)
        return hidden, model.apply({"params": params}, x, masks=masks)[0]

    for case in HF_CASES:
        x = nhwc(out[f"{case}_x"])
        grid = (x.shape[1] // 14, x.shape[2] // 14)
        masks = None
        if f"{case}_bool_masked_pos" in out:
            masks = out[f"{case}_bool_masked_pos"].reshape(-1, *grid)
            assert masks.any()
        hidden, last = forward(x, masks)
        ref = out[f"{case}_hidden_states"]
        for i, h in enumerate(hidden):
            assert rel_err(h, ref[i + 1]) < RTOL, (case, i)
        assert rel_err(last, out[f"{case}_last_hidden_state"]) < RTOL, case


def test_transformers_config_round_trip():
    config_json, _, _ = hf_checkpoint("hf_dinov2_tiny_swiglu")
    config = weights.config_from_transformers(config_json)
    assert (config.embed_dim, config.depth, config.num_heads, config.pos_grid) == (48, 2, 4, 6)
    assert weights.config_from_transformers(weights.transformers_config(config)) == config
    for field, value, match in (("model_type", "vit", "model_type"),
                                ("hidden_act", "relu", "hidden_act"),
                                ("image_size", [84, 98], "square")):
        with pytest.raises(WeightImportError, match=match):
            weights.config_from_transformers({**config_json, field: value})


# -- round trips and strictness ----------------------------------------------------------------


def assert_same_state(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("name", list(META["models"]))
def test_unimatch_round_trip(name):
    """DPT state dict -> Flax -> DPT state dict is the file; its `backbone.*` part is a
    dinov2_vit*14_pretrain.pth layout that the encoder imports and exports alone, and that the
    transformers layout carries unchanged."""
    model, params = unimatch_params(name)
    state = unimatch_state(name)
    assert_same_state(weights.dpt_to_state_dict(params), state)
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    enc = weights.encoder_from_state_dict(backbone, encoder_template(model.config.backbone),
                                          layout="dinov2")
    jax.tree.map(np.testing.assert_array_equal, enc, params["backbone"])
    assert_same_state(weights.encoder_to_state_dict(enc, layout="dinov2"), backbone)
    hf = weights.encoder_to_state_dict(enc, layout="transformers")
    back = weights.encoder_from_state_dict(hf, encoder_template(model.config.backbone),
                                           layout="transformers")
    jax.tree.map(np.testing.assert_array_equal, back, enc)
    ddp = {f"module.{k}": v for k, v in state.items()}
    jax.tree.map(np.testing.assert_array_equal,
                 weights.dpt_from_state_dict(ddp, template(model)), params)


@pytest.mark.parametrize("directory", HF_DIRS)
def test_transformers_round_trip(directory):
    config_json, state, _ = hf_checkpoint(directory)
    config = weights.config_from_transformers(config_json)
    params = weights.encoder_from_state_dict(state, encoder_template(config),
                                             layout="transformers")
    assert_same_state(weights.encoder_to_state_dict(params, layout="transformers"), state)


def test_strict_errors_name_keys():
    model = unimatch_model("dpt_tiny")
    state = dict(unimatch_state("dpt_tiny"))
    del state["head.scratch.refinenet4.resConfUnit1.conv1.weight"]
    state["head.extra.weight"] = np.zeros(3, np.float32)
    state["backbone.blocks.1.attn.qkv.weight"] = np.zeros((95, 32), np.float32)
    with pytest.raises(WeightImportError) as e:
        weights.dpt_from_state_dict(state, template(model), source="bad.pth")
    msg = str(e.value)
    assert msg.startswith("bad.pth does not fit the model:")
    assert "missing keys (1): head.scratch.refinenet4.resConfUnit1.conv1.weight" in msg
    assert "unexpected keys (1): head.extra.weight" in msg
    assert "backbone.blocks.1.attn.qkv.weight: file (95, 32), model expects (96, 32)" in msg

    config_json, hf_state, _ = hf_checkpoint("hf_dinov2_tiny")
    config = weights.config_from_transformers(config_json)
    hf_state = dict(hf_state)
    hf_state["encoder.layer.0.attention.attention.key.bias"] = np.zeros(31, np.float32)
    del hf_state["embeddings.mask_token"]
    with pytest.raises(WeightImportError) as e:
        weights.encoder_from_state_dict(hf_state, encoder_template(config),
                                        layout="transformers", source="model.safetensors")
    msg = str(e.value)
    assert "missing keys (1): embeddings.mask_token" in msg
    assert "encoder.layer.0.attention.attention.key.bias: file (31,), model expects (32,)" in msg
    # A dinov2-layout file read as transformers names every key.
    with pytest.raises(WeightImportError, match="unexpected keys .*blocks.0.attn.qkv.weight"):
        weights.encoder_from_state_dict(
            {k[len("backbone."):]: v for k, v in unimatch_state("dpt_tiny").items()
             if k.startswith("backbone.")},
            encoder_template(unimatch_model("dpt_tiny").config.backbone), layout="transformers")
    with pytest.raises(ValueError, match="layout"):
        weights.encoder_to_state_dict({}, layout="timm")


# -- presets -----------------------------------------------------------------------------------


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("size", ["small", "base", "large", "giant"])
def test_presets(size):
    """UniMatch V2's models at 518 px, traced only (jax.eval_shape): output shapes, the giant's
    SwiGLU widths, and the parameter counts UniMatch V2 logs for small and base (21 classes)."""
    encoder, head = DINOv2Config.preset(size), DPTConfig.preset(size, num_classes=21)
    model = dpt_model(encoder, head)
    x = jax.ShapeDtypeStruct((1, 518, 518, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
    logits = jax.eval_shape(model.apply, {"params": params}, x)
    assert logits.shape == (1, 518, 518, 21)
    dim = {"small": 384, "base": 768, "large": 1024, "giant": 1536}[size]
    assert params["backbone"]["pos_embed"].shape == (1, 1370, dim)
    assert len([k for k in params["backbone"] if k.startswith("blocks_")]) == encoder.depth
    if size == "giant":
        assert params["backbone"]["blocks_0"]["mlp"]["w12"]["kernel"].shape == (1536, 8192)
        assert params["backbone"]["blocks_0"]["mlp"]["w3"]["kernel"].shape == (4096, 1536)
    logged = {"small": (22.1, 2.7), "base": (86.6, 10.9)}  # its training logs, in millions
    if size in logged:
        assert (round(count(params["backbone"]) / 1e6, 1),
                round(count(params["head"]) / 1e6, 1)) == logged[size]


def test_bfloat16_compute():
    """dtype bfloat16 computes encoder and head in bfloat16 (float32 parameters and logits), near
    float32."""
    model, params = unimatch_params("dpt_tiny")
    x = nhwc(REC["dpt_tiny_square_x"])
    low = dpt_model(model.config.backbone, model.config.dpt, jnp.bfloat16)
    tokens = jax.jit(lambda p, x: DINOv2(low.config.backbone, low.dtype).apply(
        {"params": p["backbone"]}, x))(params, x)
    assert tokens[0].dtype == jnp.bfloat16
    logits = jax.jit(low.apply)({"params": params}, x)
    assert logits.dtype == jnp.float32
    err = rel_err(np.asarray(logits), nhwc(REC["dpt_tiny_square_logits"]))
    assert 1e-4 < err < 0.05  # bfloat16's rounding, not float32's


def test_config_errors():
    with pytest.raises(ValueError, match="unknown DINOv2 size"):
        DINOv2Config.preset("huge")
    with pytest.raises(ValueError, match="ffn"):
        DINOv2Config(ffn="geglu")
    with pytest.raises(ValueError, match="divisible"):
        DINOv2Config(embed_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="4 entries"):
        DPTConfig(layers=(1, 2, 3))
    with pytest.raises(ValueError, match="beyond the encoder's depth"):
        dpt_model(DINOv2Config(embed_dim=8, depth=2, num_heads=1, pos_grid=2), DPTConfig())
