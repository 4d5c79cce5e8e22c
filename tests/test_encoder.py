"""The encoder family as a config choice (`model.encoder`): the DINOv2 model with UniMatch V2's DPT
head, AllSpark inside it, and the config keys each family reads."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from allspark_jax import config as config_lib
from allspark_jax import errors
from allspark_jax.models import segmentor
from allspark_jax.models.dinov2 import DINOv2Config
from allspark_jax.models.dpt import DPTConfig
from allspark_jax.models.resize import resize_bilinear_align_corners
from allspark_jax.weights import loader, release_files

TINY_DINOV2 = dict(embed_dim=32, depth=4, num_heads=2, pos_grid=4)
TINY_DPT = dict(features=16, out_channels=(8, 16, 16, 32), layers=(0, 1, 2, 3))
CROP = 42  # a 3 x 3 token grid; the stored position grid is 4 x 4, so it is interpolated


def dinov2_config(method="allspark", **model):
    """configs/demo.py:METHOD,dinov2 on an even smaller DINOv2 and crop."""
    config = config_lib.load_config(f"configs/demo.py:{method},dinov2")
    set_backbone(config, dict(TINY_DINOV2))
    for key, value in TINY_DPT.items():
        config.model.dpt[key] = value
    config.data.crop_size = CROP
    for key, value in model.items():
        config.model[key] = value
    return config


def set_backbone(config, value):
    """A preset name or a dict of fields (the key's type changes, as configs/demo.py does)."""
    del config.model.backbone
    config.model.backbone = value


def test_a_dinov2_size_gets_unimatch_v2s_head_for_it():
    config = dinov2_config()
    set_backbone(config, "base")
    for key in TINY_DPT:
        config.model.dpt[key] = None
    m = segmentor.model_config_from(config)
    assert m.encoder == "dinov2" and m.backbone == DINOv2Config.preset("base")
    assert m.dpt == DPTConfig.preset("base", num_classes=config.model.num_classes)
    config.model.dpt.features = 32  # a field given overrides the preset's
    assert segmentor.model_config_from(config).dpt.features == 32
    assert m.patch_multiple == 14
    assert segmentor.model_config_from(config_lib.load_config("configs/demo.py")).patch_multiple == 1


@pytest.mark.parametrize("change,message", [
    (dict(encoder="vit"), r"config.model.encoder='vit': expected one of 'mit', 'dinov2'"),
    (dict(backbone="b5"), r"config.model.backbone='b5' \(model.encoder='dinov2'\): unknown DINOv2 "
                          r"size 'b5'"),
    (dict(backbone=dict(TINY_DINOV2, width=3)), r"unknown DINOv2Config fields \['width'\]"),
    (dict(dpt=dict(features=None, out_channels=None, layers=None)),
     r"config.model.dpt.features: a DINOv2 backbone given by its fields has no preset head"),
    (dict(dpt=dict(TINY_DPT, layers=(0, 1, 2, 4))), r"read blocks beyond the encoder's depth 4"),
    (dict(decoder_dim=64), r"config.model.decoder_dim=64: expected 768 \(its configs/default.py "
                           r"value\): only model.encoder 'mit' reads it"),
])
def test_bad_dinov2_settings_name_the_key(change, message):
    config = dinov2_config()
    for key, value in change.items():
        if key == "dpt":
            for k, v in value.items():
                config.model.dpt[k] = v
        elif key == "backbone":
            set_backbone(config, value)
        else:
            config.model[key] = value
    with pytest.raises(errors.ConfigError, match=message):
        config_lib.validate(config)


def test_training_crops_are_multiples_of_the_patch_and_mit_leaves_the_dpt_keys_alone():
    config = dinov2_config()
    config.data.crop_size = 43
    with pytest.raises(errors.DataError, match=r"config.data.crop_size=43: expected a multiple "
                                                 r"of 14"):
        config_lib.validate(config)
    config_lib.validate(dinov2_config())
    mit = config_lib.load_config("configs/demo.py")
    mit.model.dpt.features = 16
    with pytest.raises(errors.ConfigError, match=r"config.model.dpt.features=16: expected None .*"
                                                 r"only model.encoder 'dinov2' reads it"):
        config_lib.validate(mit)


def _init(config, batch=2):
    model = segmentor.build_model(config)
    return model, jax.jit(lambda r: segmentor.init_variables(model, r, CROP, batch))(
        jax.random.key(0))


@pytest.fixture(scope="module")
def allspark_dinov2():
    """The tiny AllSpark-on-DINOv2 model and its variables (initialised once for the module)."""
    return _init(dinov2_config())


def test_a_dinov2_encoder_is_saved_and_loaded_as_model_pretrained(allspark_dinov2, tmp_path):
    """The learning benchmark's source-task encoder: written in facebookresearch's
    dinov2_vit*14_pretrain.pth names, read back as `model.pretrained` (encoder only, strict)."""
    _, v = allspark_dinov2
    other = jax.tree.map(lambda a: a + 1, v)
    for suffix in ("npz", "pth"):
        path = str(tmp_path / f"encoder.{suffix}")
        release_files.save_pretrained_encoder(v, path)
        state = release_files.read_npz(path) if suffix == "npz" else release_files.read_pth(path)
        assert {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight",
                "blocks.3.attn.qkv.weight", "blocks.0.ls1.gamma", "norm.weight"} <= set(state)
        assert not any(k.startswith(("backbone.", "head.")) for k in state)
        loaded = loader.load_pretrained_encoder(path, other)
        for key, want in (("backbone", v), ("head", other), ("allspark", other)):
            for a, b in zip(jax.tree.leaves(loaded["params"][key]),
                            jax.tree.leaves(want["params"][key])):
                np.testing.assert_array_equal(a, b)
    # another size is refused, naming the file and the keys
    bigger = dinov2_config(backbone=dict(TINY_DINOV2, depth=5))
    model5 = segmentor.build_model(bigger)
    v5 = jax.eval_shape(lambda: segmentor.init_variables(model5, jax.random.key(0), CROP))
    with pytest.raises(errors.WeightImportError,
                       match=r"encoder\.pth does not fit the model:\n  missing keys \(14\): "
                             r"blocks\.4\.attn"):
        loader.load_pretrained_encoder(path, v5)


def test_allspark_sits_on_the_last_map_the_dpt_head_reads(allspark_dinov2):
    model, v = allspark_dinov2
    assert set(v["params"]) == {"backbone", "allspark", "head"} and v["batch_stats"] == {}
    d = TINY_DINOV2["embed_dim"]
    # The Semantic Memory: (classes, channels D, tokens of the crop's 14-px grid).
    assert v["memory"]["allspark"]["attn"]["kv_queue"].shape == (5, d, (CROP // 14) ** 2)
    assert v["params"]["allspark"]["map_in"]["kernel"].shape[-2:] == (d, d)
    head = v["params"]["head"]  # model.dpt.out_channels and features are the head's widths
    assert [head[f"projects_{i}"]["kernel"].shape[-1] for i in range(4)] == list(
        TINY_DPT["out_channels"])
    assert head["layer1_rn"]["kernel"].shape[-1] == TINY_DPT["features"]
    x = jax.random.normal(jax.random.key(1), (4, CROP, CROP, 3))
    t = jax.random.normal(jax.random.key(2), (2, CROP, CROP, 5))
    logits, updates = model.apply(v, x, mode="train", teacher_logits=t, use_memory=True,
                                  rngs={"dropout": jax.random.key(3)},
                                  mutable=["batch_stats", "memory"])
    assert logits.shape == (4, CROP, CROP, 5) and bool(jnp.all(jnp.isfinite(logits)))
    assert not np.array_equal(updates["memory"]["allspark"]["attn"]["kv_queue"],
                              v["memory"]["allspark"]["attn"]["kv_queue"])
    with pytest.raises(ValueError, match=r"multiples of the 14-px patch .* got 43x43"):
        model.apply(v, jnp.zeros((2, 43, 43, 3)), mode="teacher")


def test_without_allspark_it_is_unimatch_v2s_dpt_model_and_evaluates_as_its_evaluate():
    """semi's model is `dpt_model` (whose forward tests/test_dinov2.py checks against UniMatch V2's
    recordings); "eval" mode is UniMatch V2's `evaluate`: to the nearest multiples of 14, the DPT
    forward, and back, bilinear with align_corners=True both ways."""
    config = dinov2_config("semi")
    model, v = _init(config)
    assert "memory" not in v and set(v["params"]) == {"backbone", "head"}
    m = segmentor.model_config_from(config)
    dpt = segmentor.dpt_model(m.backbone, m.dpt)
    shapes = lambda tree: jax.tree.map(lambda a: a.shape, tree)  # noqa: E731
    assert shapes(v["params"]) == shapes(jax.eval_shape(
        lambda: segmentor.init_variables(dpt, jax.random.key(0), CROP))["params"])
    y = jax.random.normal(jax.random.key(4), (1, 37, 50, 3))
    forward = model.apply(v, resize_bilinear_align_corners(y, (42, 56)), mode="teacher")
    want = resize_bilinear_align_corners(forward, (37, 50))
    got = model.apply(v, y, mode="eval")
    assert got.shape == (1, 37, 50, 5)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # A side that rounds down (8 px -> one 14-px patch at least).
    assert model.apply(v, y[:, :8, :20], mode="eval").shape == (1, 8, 20, 5)


def test_allspark_on_dinov2_evaluates_padded_batches_image_by_image(allspark_dinov2):
    """AllSpark's eval attention sums over each image's true tokens only: a padded batch gives each
    image its logits alone (UniMatch V2's evaluation resizes around the model)."""
    model, v = allspark_dinov2
    v = {k: v[k] for k in ("params", "batch_stats")}
    sizes = [(37, 50), (61, 44)]
    images = [np.asarray(jax.random.normal(jax.random.key(10 + i), s + (3,)))
              for i, s in enumerate(sizes)]
    batch = np.array(jax.random.normal(jax.random.key(9), (2, 64, 64, 3)))  # noise padding
    for b, img in enumerate(images):
        batch[b, :img.shape[0], :img.shape[1]] = img
    padded = jax.jit(lambda v, x, s: model.apply(v, x, mode="eval", valid_size=s))(
        v, batch, np.asarray(sizes, np.int32))
    for b, img in enumerate(images):
        alone = model.apply(v, img[None], mode="eval")[0]
        h, w = img.shape[:2]
        err = float(jnp.abs(padded[b, :h, :w] - alone).max() / jnp.abs(alone).max())
        assert err < 1e-5, (b, err)
        assert not np.asarray(padded[b, h:]).any() and not np.asarray(padded[b, :, w:]).any()


def test_inspection_reads_allspark_on_dinov2():
    """`inspection.allspark_internals` on the DINOv2 model: AllSpark's grid is the 14-px one."""
    from allspark_jax import inspection
    model, v = _init(dinov2_config())
    assert segmentor.model_config_from(dinov2_config()).allspark_grid((CROP, 70)) == (3, 5)
    x = jax.random.normal(jax.random.key(1), (2, CROP, CROP, 3))
    out = inspection.allspark_internals(model, v, x, x[::-1])
    assert out["grid"] == (3, 3)
    assert out["channel_class"].shape == (2, TINY_DINOV2["embed_dim"])
    assert out["memory_after"]["kv_queue"].shape == (5, TINY_DINOV2["embed_dim"], 9)


def test_weight_decay_skips_the_dpt_parameters_the_forward_never_applies():
    """refinenet4's resConfUnit1 (no skip input) and the encoder's mask token (no masks) get no
    gradient; PyTorch's SGD then skips them, weight decay included. One step on zero gradients:
    they stay, every other parameter decays."""
    import ml_collections
    from allspark_jax import optimizer
    _, v = _init(dinov2_config("semi"))
    params = jax.tree.map(lambda p: p + 0.01, v["params"])  # zero-initialised biases too
    tx, _ = optimizer.create_optimizer(ml_collections.ConfigDict(dict(
        name="sgd", lr=0.1, lr_multi=10.0, momentum=0.9, weight_decay=0.5, poly_power=0.9)), 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    moved = jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates)
    never = moved["head"]["refinenet4"]["resConfUnit1"]
    assert not any(jax.tree.leaves(never))
    moved["head"]["refinenet4"].pop("resConfUnit1")
    assert not moved["backbone"].pop("mask_token")
    assert all(jax.tree.leaves(moved))  # refinenet3's resConfUnit1 included
