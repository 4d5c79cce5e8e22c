"""UniMatch V2's recipe (methods 'unimatch_v2', 'unimatch_v2_allspark'): its EMA schedule, CutMix
partners, unlabeled loss, AdamW, the two student passes on MiT and the AllSpark module fed two
views. The whole iteration against UniMatch V2's own trainer: tests/data/unimatch_v2_tiny.npz
through the verifier (test_verify_reference.py)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from allspark_jax import losses, method as method_lib, optimizer, state as state_lib, train_step
from allspark_jax.errors import ConfigError
from allspark_jax.models.allspark import CrossAttnMem, group_channels, update_memory
from allspark_jax.models.mit import MiTConfig
from allspark_jax.models.segmentor import AllSparkSegmentor, ModelConfig, draw_feature_scale
from allspark_jax.configs import default

S, B, K = 33, 4, 3
ADAMW = ml_collections.ConfigDict(dict(name="adamw", lr=1e-3, lr_multi=10.0, momentum=0.9,
                                       betas=(0.9, 0.999), weight_decay=0.01, poly_power=0.9))


def train_config(**overrides):
    config = default.get_config().train
    config.update(loss_x="ce", loss_groups=2, ema_decay=0.996, conf_thresh=0.37,
                  loss_u_ignore_padding=True, key_group_size=None, ohem_thresh=0.7,
                  ohem_min_kept=100)
    config.update(overrides)
    return config


def uv2(name="unimatch_v2", cutmix_prob=0.5):
    return method_lib.resolve(name, teacher="ema", student_view="strong", cutmix_prob=cutmix_prob)


def tiny(allspark: bool) -> ModelConfig:
    return ModelConfig(backbone=MiTConfig(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1),
                                          num_heads=(1, 2, 3, 4), drop_path_rate=0.1),
                       num_classes=K, allspark_heads=2, decoder_dim=16, head_dropout=0.1,
                       attn_drop=0.1, proj_drop=0.1, allspark=allspark)


def test_the_recipe_needs_its_teacher_and_strong_views():
    assert uv2().strong_views == 2 and uv2().ema and not uv2().allspark
    assert uv2("unimatch_v2_allspark").allspark
    with pytest.raises(ConfigError, match=r"config.train.teacher='online': method 'unimatch_v2' "
                                          r".* expected 'ema'"):
        method_lib.resolve("unimatch_v2", teacher="online", student_view="strong", cutmix_prob=0)
    with pytest.raises(ConfigError, match=r"config.data.student_view='weak': .* expected 'strong'"):
        method_lib.resolve("unimatch_v2_allspark", teacher="ema", student_view="weak",
                           cutmix_prob=0)


def test_ema_decay_schedule():
    cfg = train_config()
    got = [float(train_step.ema_decay(jnp.array(t), uv2(), cfg)) for t in (0, 1, 3, 10**6)]
    np.testing.assert_allclose(got, [0.0, 0.5, 0.75, 0.996], rtol=1e-6)
    release = method_lib.resolve("allspark", teacher="ema", student_view="weak", cutmix_prob=0)
    assert train_step.ema_decay(jnp.array(0), release, cfg) == 0.996  # constant


def test_cutmix_partners_mirror_each_group():
    a = jnp.arange(8)
    np.testing.assert_array_equal(train_step.flip_in_groups(a, 1), [7, 6, 5, 4, 3, 2, 1, 0])
    np.testing.assert_array_equal(train_step.flip_in_groups(a, 2), [3, 2, 1, 0, 7, 6, 5, 4])
    with pytest.raises(ValueError, match="train.loss_groups=3 must divide the unlabeled batch of 8"):
        train_step.flip_in_groups(a, 3)


def test_confident_cross_entropy_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 5, 6, K)).astype(np.float32)
    target = rng.integers(0, K, (4, 5, 6))
    conf, valid = rng.random((4, 5, 6)) > 0.4, rng.random((4, 5, 6)) > 0.2
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, target[..., None], -1)[..., 0]
    want = np.mean([np.sum((nll * (conf & valid))[g]) / np.sum(valid[g])
                    for g in (slice(0, 2), slice(2, 4))])
    got = losses.confident_cross_entropy(logits, target, conf, valid, groups=2)
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.8, 0.99)])
def test_adamw_decoupled_weight_decay_and_groups(betas):
    """Two PyTorch AdamW steps by hand: m, v with bias correction, p -= lr (m_hat / (sqrt(v_hat)
    + eps) + wd p); the never-applied mask token gets no decay."""
    b1, b2 = betas
    tx, _ = optimizer.create_optimizer(ml_collections.ConfigDict({**ADAMW.to_dict(),
                                                                   "betas": betas}), 10)
    params = {"backbone": {"w": jnp.array([1.0, -2.0]), "mask_token": jnp.array([0.7])},
              "head": {"w": jnp.array([0.5])}}
    grads = {"backbone": {"w": jnp.array([0.1, 0.2]), "mask_token": jnp.array([0.0])},
             "head": {"w": jnp.array([-0.3])}}
    opt_state = tx.init(params)
    p = {k: np.asarray(v["w"], np.float64) for k, v in params.items()}
    m = {k: 0.0 for k in p}
    v = {k: 0.0 for k in p}
    for t in (1, 2):
        updates, opt_state = tx.update(grads, opt_state, params)
        params = jax.tree.map(lambda a, u: a + u, params, updates)
        for k, lr in (("backbone", 1e-3), ("head", 1e-2)):  # steps 0 and 1 run at the base rate
            g = np.asarray(grads[k]["w"], np.float64)
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            step = (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + 1e-8)
            p[k] = p[k] - lr * (step + 0.01 * p[k])
    for k in p:
        np.testing.assert_allclose(params[k]["w"], p[k], rtol=1e-6)
    assert float(params["backbone"]["mask_token"][0]) == np.float32(0.7)


def _batch(rng, cutmix: bool):
    image = lambda: rng.normal(size=(B, S, S, 3)).astype(np.float32)  # noqa: E731
    batch = {"image_l": image(), "mask_l": rng.integers(0, K, (B, S, S)).astype(np.int32),
             "image_u_w": image(), "image_u_s1": image(), "image_u_s2": image(),
             "pad_u": np.zeros((B, S, S), bool)}
    batch["pad_u"][:, :, -6:] = True
    if cutmix:
        for v in (1, 2):
            box = np.zeros((B, S, S), bool)
            box[v - 1::2, 4:20, 2 + v:25] = True
            batch[f"cutmix_u{v}"] = box
    return batch


@pytest.fixture(scope="module")
def mit_steps():
    """Two unimatch_v2 steps of a tiny MiT + SegFormer head, the dropout scale fed in."""
    model = AllSparkSegmentor(tiny(False))
    tx, _ = optimizer.create_optimizer(ADAMW, total_steps=10)
    state = state_lib.create_train_state(model, tx, jax.random.key(0), S, ema=True)
    rng = np.random.default_rng(1)
    batch = _batch(rng, cutmix=True)
    batch["feature_scale"] = tuple(np.asarray(s) for s in draw_feature_scale(
        model.config, jax.random.key(5), 2 * B))
    step = jax.jit(lambda s, b: train_step.train_step(
        s, b, model=model, tx=tx, train_config=train_config(), use_memory=False, method=uv2()))
    states, outs = [jax.device_get(state)], []
    for _ in range(2):
        state, metrics = step(state, batch)
        states.append(jax.device_get(state))
        outs.append(jax.device_get(metrics))
    return model, batch, states, outs


def test_the_teacher_starts_as_the_updated_student_then_averages(mit_steps):
    _, _, (s0, s1, s2), _ = mit_steps
    for got, want in ((s1.ema_params, s1.params), (s1.ema_batch_stats, s1.batch_stats)):
        jax.tree.map(np.testing.assert_array_equal, got, want)  # decay 0 after step 0
    for got, old, new in ((s2.ema_params, s1.ema_params, s2.params),
                          (s2.ema_batch_stats, s1.ema_batch_stats, s2.batch_stats)):
        jax.tree.map(lambda g, o, n: np.testing.assert_allclose(g, 0.5 * o + 0.5 * n, rtol=1e-6,
                                                                atol=1e-7), got, old, new)
    assert not np.array_equal(s2.params["head"]["linear_pred"]["kernel"],
                              s1.params["head"]["linear_pred"]["kernel"])
    # every teacher leaf keeps its dtype (BatchNorm's integer count too: the compiled step's
    # state must keep its types)
    assert (jax.tree.map(lambda a: a.dtype, s2.ema_batch_stats)
            == jax.tree.map(lambda a: a.dtype, s0.ema_batch_stats))


def test_the_student_runs_two_passes_each_with_its_batch_statistics(mit_steps):
    """UniMatch V2's model(img_x) then model(cat(s1, s2), comp_drop=True): BatchNorm's running
    statistics after the step are those of the labeled pass followed by the strong pass."""
    model, batch, (s0, s1, _), _ = mit_steps
    cfg = train_config()
    key = jax.random.fold_in(jax.random.wrap_key_data(s0.rng), s0.step)
    k_x, k_s, _ = jax.random.split(key, 3)
    teacher = model.apply(s0.variables(teacher=True), batch["image_u_w"], mode="teacher")
    views = [np.where(batch[f"cutmix_u{v}"][..., None],
                      np.asarray(train_step.flip_in_groups(batch[f"image_u_s{v}"],
                                                           cfg.loss_groups)),
                      batch[f"image_u_s{v}"]) for v in (1, 2)]
    assert teacher.shape == (B, S, S, K)
    _, upd = model.apply(s0.variables(), batch["image_l"], mode="train", rngs={"dropout": k_x},
                         mutable=["batch_stats"])
    _, upd = model.apply({**s0.variables(), **upd}, np.concatenate(views), mode="train",
                         feature_scale=batch["feature_scale"], rngs={"dropout": k_s},
                         mutable=["batch_stats"])
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6),
                 s1.batch_stats, jax.device_get(upd["batch_stats"]))
    _, one_pass = model.apply(s0.variables(), np.concatenate([batch["image_l"], *views]),
                              mode="train", rngs={"dropout": k_x}, mutable=["batch_stats"])
    mean = lambda t: t["head"]["linear_fuse"]["bn"]["mean"]  # noqa: E731
    assert not np.allclose(mean(s1.batch_stats), mean(jax.device_get(one_pass["batch_stats"])))


def test_pseudo_labels_come_from_the_mirrored_partner_inside_each_box(mit_steps):
    _, batch, _, outs = mit_steps
    cfg = train_config()
    logits = outs[0]["teacher_logits"]
    conf = jax.nn.softmax(logits, -1).max(-1)
    for v in (1, 2):
        box = batch[f"cutmix_u{v}"]
        mixed = lambda a: np.where(box, np.asarray(train_step.flip_in_groups(a, 2)), a)  # noqa
        want = np.where((mixed(np.asarray(conf)) >= cfg.conf_thresh) & ~mixed(batch["pad_u"]),
                        mixed(logits.argmax(-1)), 255)
        np.testing.assert_array_equal(outs[0]["pseudo_label"][(v - 1) * B:v * B], want)
    # a real mix: inside some box the partner's argmax differs from the image's own
    partner = np.asarray(train_step.flip_in_groups(logits.argmax(-1), 2))
    assert np.any((partner != logits.argmax(-1)) & batch["cutmix_u1"])
    assert 0 < outs[0]["mask_ratio"] < 1  # the threshold passes some pixels, not all
    np.testing.assert_allclose(outs[0]["loss"], (outs[0]["loss_x"] + outs[0]["loss_u"]) / 2)
    np.testing.assert_allclose(outs[0]["loss_u"], (outs[0]["loss_s1"] + outs[0]["loss_s2"]) / 2)


def test_mit_feature_scale_drops_stage_channels():
    model = AllSparkSegmentor(tiny(False))
    variables = model.init({"params": jax.random.key(0)}, jnp.zeros((2, S, S, 3)))
    x = np.random.default_rng(0).normal(size=(2, S, S, 3)).astype(np.float32)
    ones = tuple(jnp.ones((2, w)) for w in (8, 16, 24, 32))
    run = lambda s: model.apply(variables, x, mode="teacher", feature_scale=s)  # noqa: E731
    np.testing.assert_allclose(run(ones), model.apply(variables, x, mode="teacher"), atol=1e-6)
    dropped = ones[:3] + (ones[3].at[:, :16].set(0.0),)
    assert not np.allclose(run(dropped), run(ones), atol=1e-4)
    with pytest.raises(ValueError, match=r"feature_scale of a MiT encoder: one \(B, C\) scale per "
                                         r"stage map"):
        run(ones[:3])
    scale = draw_feature_scale(tiny(False), jax.random.key(1), 4)
    assert [s.shape for s in scale] == [(4, w) for w in (8, 16, 24, 32)]
    np.testing.assert_array_equal(scale[0][:2] + scale[0][2:] >= 2, True)  # complementary


def test_allspark_keys_of_two_views_follow_the_labeled_image_group():
    """With two views (B labeled, 2B unlabeled) and key_group_size 1, labeled image i reads the
    channels of unlabeled image i of both views and of no other image."""
    n, c = 9, 8
    module = CrossAttnMem(c, 2, K, attn_drop=0.0, proj_drop=0.0)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(3 * 2, n, c)).astype(np.float32)  # 2 labeled, 2 x 2 unlabeled
    teacher = rng.normal(size=(4, 3, 3, K)).astype(np.float32)
    kwargs = dict(mode="train", grid=(3, 3), teacher_logits=teacher, key_group_size=1)
    variables = module.init({"params": jax.random.key(0)}, emb, **kwargs)
    out = lambda e: module.apply(variables, e, mutable=["memory"], **kwargs)[0]  # noqa: E731
    base = np.asarray(out(emb))
    assert base.shape == (6, n, c)
    for u, reader in ((2, 0), (4, 0), (3, 1), (5, 1)):  # view 1 then view 2, image 0 then 1
        moved = emb.copy()
        moved[u] += 1.0
        changed = np.abs(np.asarray(out(moved))[:2] - base[:2]).max(axis=(1, 2)) > 1e-6
        np.testing.assert_array_equal(changed, [reader == 0, reader == 1])
    # the Semantic Memory takes the channels of all 2B unlabeled images, view after view
    _, memory = module.apply(variables, emb, mutable=["memory"], **kwargs)
    old = variables["memory"]
    want = update_memory(old["kv_queue"], old["queue_ptr"],
                         group_channels(teacher, emb[2:], (3, 3)), emb[2:])
    np.testing.assert_array_equal(memory["memory"]["kv_queue"], want[0])
    np.testing.assert_array_equal(memory["memory"]["queue_ptr"], want[1])
    with pytest.raises(ValueError, match="expected the unlabeled count a multiple of the labeled"):
        module.apply(variables, np.concatenate([emb[:1], emb]), mutable=["memory"], **kwargs)


def test_unimatch_v2_allspark_step_runs_before_and_after_the_warm_up():
    model = AllSparkSegmentor(tiny(True))
    tx, _ = optimizer.create_optimizer(ADAMW, total_steps=10)
    state = state_lib.create_train_state(model, tx, jax.random.key(0), S, ema=True)
    batch = _batch(np.random.default_rng(2), cutmix=True)
    before = jax.device_get(state.memory["allspark"]["attn"])
    for use_memory in (False, True):
        state, metrics = train_step.make_train_step(
            model, tx, train_config(), use_memory=use_memory, method=uv2("unimatch_v2_allspark"),
            with_outputs=True)(state, batch)
        assert np.isfinite(metrics["loss"]) and metrics["pseudo_label"].shape == (2 * B, S, S)
    after = jax.device_get(state.memory["allspark"]["attn"])
    assert not np.array_equal(after["kv_queue"], before["kv_queue"])
