"""The optimiser, the schedule, the EMA teacher and the losses against the release's numbers;
CutMix against numpy."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from allspark_jax import method as method_lib
from allspark_jax import losses, optimizer, state as state_lib, train_step
from allspark_jax.models.mit import MiTConfig
from allspark_jax.models.segmentor import AllSparkSegmentor, ModelConfig
from allspark_jax.configs import default
from reference_model import reference

OPTIM = ml_collections.ConfigDict(dict(name="sgd", lr=0.01, lr_multi=10.0, momentum=0.9,
                                       weight_decay=1e-4, poly_power=0.9))


def train_config(**overrides):
    config = default.get_config().train
    config.update(loss_x="ce", loss_groups=1, ema_decay=0.9, conf_thresh=0.0,
                  loss_u_ignore_padding=False, key_group_size=None, ohem_thresh=0.7,
                  ohem_min_kept=100)
    config.update(overrides)
    return config


def method(name="allspark", teacher="online"):
    """The method `name` with `teacher`, the student on the weak view, no CutMix."""
    return method_lib.resolve(name, teacher=teacher, student_view="weak", cutmix_prob=0.0)


def test_poly_schedule_offset():
    sched = optimizer.poly_schedule(0.01, 10)
    # Steps 0 and 1 both run at the base rate; step t >= 1 at base * (1 - (t - 1) / total)^0.9.
    np.testing.assert_allclose([sched(t) for t in range(4)],
                               [0.01, 0.01, 0.01 * 0.9 ** 0.9, 0.01 * 0.8 ** 0.9], rtol=1e-6)


def test_sgd_coupled_weight_decay_and_groups():
    """Two PyTorch SGD steps by hand: buf = m * buf + (g + wd * p); p -= lr_group * buf."""
    tx, _ = optimizer.create_optimizer(OPTIM, total_steps=10)
    params = {"backbone": {"w": jnp.array([1.0, -2.0])}, "head": {"w": jnp.array([0.5])}}
    grads = {"backbone": {"w": jnp.array([0.1, 0.2])}, "head": {"w": jnp.array([-0.3])}}
    opt_state = tx.init(params)
    p = {k: np.asarray(v["w"], np.float64) for k, v in params.items()}
    buf = {k: 0.0 for k in p}
    for _ in range(2):
        updates, opt_state = tx.update(grads, opt_state, params)
        params = jax.tree.map(lambda a, u: a + u, params, updates)
        for k, lr in (("backbone", 0.01), ("head", 0.1)):
            buf[k] = 0.9 * buf[k] + np.asarray(grads[k]["w"]) + 1e-4 * p[k]
            p[k] = p[k] - lr * buf[k]
    for k in p:
        np.testing.assert_allclose(params[k]["w"], p[k], rtol=1e-6)


TINY = ModelConfig(backbone=MiTConfig(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1),
                                      num_heads=(1, 2, 3, 4), drop_path_rate=0.1),
                   num_classes=3, allspark_heads=2, decoder_dim=16, head_dropout=0.1,
                   attn_drop=0.1, proj_drop=0.1, allspark=True)


@pytest.fixture(scope="module")
def ema_step():
    model = AllSparkSegmentor(TINY)
    tx, _ = optimizer.create_optimizer(OPTIM, total_steps=10)
    state = state_lib.create_train_state(model, tx, jax.random.key(0), 33, ema=True)
    step = train_step.make_train_step(model, tx, train_config(), use_memory=True,
                                      method=method(teacher="ema"))
    rng = np.random.default_rng(0)
    x_u = rng.normal(size=(2, 33, 33, 3)).astype(np.float32)
    batch = {"image_l": rng.normal(size=(2, 33, 33, 3)).astype(np.float32),
             "mask_l": rng.integers(0, 3, (2, 33, 33)).astype(np.int32),
             "image_u_w": x_u, "image_u_s": x_u, "pad_u": np.zeros((2, 33, 33), bool)}
    before = jax.device_get(state)
    after, metrics = step(state, batch)
    return before, jax.device_get(after), metrics


def test_ema_teacher_moves_by_the_configured_decay(ema_step):
    before, after, metrics = ema_step
    assert np.isfinite(metrics["loss"])
    want = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, before.ema_params, after.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 after.ema_params, want)
    # The student moved, and the teacher moved by exactly a tenth of the way towards it.
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), before.params,
                                         after.params))
    assert max(moved) > 0
    jax.tree.map(np.testing.assert_array_equal, after.ema_batch_stats, after.batch_stats)
    assert int(after.step) == 1


def test_pseudo_label_options():
    logits = jnp.array([[[[2.0, 0.0, 0.0], [0.1, 0.0, 0.0]]]])  # (1, 1, 2, 3)
    pad = jnp.array([[[False, True]]])
    np.testing.assert_array_equal(train_step.pseudo_labels(logits, pad, train_config()), [[[0, 0]]])
    np.testing.assert_array_equal(
        train_step.pseudo_labels(logits, pad, train_config(conf_thresh=0.5)), [[[0, 255]]])
    np.testing.assert_array_equal(
        train_step.pseudo_labels(logits, pad, train_config(loss_u_ignore_padding=True)), [[[0, 255]]])


@pytest.fixture(scope="module")
def loss_case():
    d = reference().data
    return np.transpose(d["loss/logits"], (0, 2, 3, 1)), d["loss/target"].astype(np.int32), d


def test_ce_and_ohem_match_release(loss_case):
    logits, target, d = loss_case
    np.testing.assert_allclose(losses.cross_entropy(logits, target), d["loss/ce"], rtol=1e-6)
    for k in (50, 100000):
        np.testing.assert_allclose(losses.ohem_cross_entropy(logits, target, min_kept=k),
                                   d[f"loss/ohem_min_kept{k}"], rtol=1e-6)
    # min_kept=50 really mines (a different value from plain CE); 100000 > valid pixels falls back.
    assert abs(float(d["loss/ohem_min_kept50"]) - float(d["loss/ce"])) > 1e-3
    np.testing.assert_allclose(d["loss/ohem_min_kept100000"], d["loss/ce"], rtol=1e-6)


def test_loss_groups_average_per_group(loss_case):
    logits, target, _ = loss_case
    per_image = [losses.cross_entropy(logits[i:i + 1], target[i:i + 1]) for i in range(2)]
    np.testing.assert_allclose(losses.cross_entropy(logits, target, groups=2),
                               np.mean(per_image), rtol=1e-6)


def one_step(model, teacher="online"):
    tx, _ = optimizer.create_optimizer(OPTIM, total_steps=10)
    state = state_lib.create_train_state(AllSparkSegmentor(TINY), tx, jax.random.key(0), 33,
                                     ema=teacher == "ema")
    step = train_step.make_train_step(model, tx, train_config(), use_memory=True,
                                      method=method(teacher=teacher))
    rng = np.random.default_rng(1)
    x_u = rng.normal(size=(2, 33, 33, 3)).astype(np.float32)
    batch = {"image_l": rng.normal(size=(2, 33, 33, 3)).astype(np.float32),
             "mask_l": rng.integers(0, 3, (2, 33, 33)).astype(np.int32),
             "image_u_w": x_u, "image_u_s": x_u, "pad_u": np.zeros((2, 33, 33), bool)}
    state, metrics = step(state, batch)
    return jax.device_get(state), jax.device_get(metrics)


@pytest.fixture(scope="module")
def f32_step():
    return one_step(AllSparkSegmentor(TINY))


def test_remat_changes_nothing_but_memory_use(f32_step):
    state, metrics = f32_step
    remat_state, remat_metrics = one_step(AllSparkSegmentor(TINY, remat=True))
    np.testing.assert_allclose(remat_metrics["loss"], metrics["loss"], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 remat_state.params, state.params)


def test_bfloat16_compute_keeps_float32_master_weights(f32_step):
    state, metrics = f32_step
    bf_state, bf_metrics = one_step(AllSparkSegmentor(TINY, dtype=jnp.bfloat16))
    assert {x.dtype for x in jax.tree.leaves(bf_state.params)} == {np.dtype(np.float32)}
    assert bf_state.memory["allspark"]["attn"]["kv_queue"].dtype == np.float32
    np.testing.assert_allclose(bf_metrics["loss"], metrics["loss"], rtol=5e-2)


def _numpy_cutmix(box, a):
    """image i's box takes image i - 1 (mod B): the construction spelled out per image."""
    out = a.copy()
    for i in range(a.shape[0]):
        out[i][box[i]] = a[i - 1][box[i]]
    return out


def _boxes(b, s, rng):
    box = np.zeros((b, s, s), bool)
    for i in range(b - 1):  # the last image has no box (probability 1 - cutmix_prob)
        y, x = rng.integers(0, s // 2, 2)
        h, w = rng.integers(1, s // 2, 2)
        box[i, y:y + h, x:x + w] = True
    return box


def test_cutmix_matches_numpy():
    rng = np.random.default_rng(3)
    b, s, k = 4, 17, 3
    box = _boxes(b, s, rng)
    image = rng.normal(size=(b, s, s, 3)).astype(np.float32)
    logits = rng.normal(size=(b, s, s, k)).astype(np.float32)
    pseudo = rng.integers(0, k, (b, s, s)).astype(np.int32)
    pseudo[1, :5] = 255  # the partner's ignored pixels stay ignored inside the box
    got = jax.jit(train_step.cutmix)(box, image, logits, pseudo)
    for g, want in zip(got, (image, logits, pseudo)):
        np.testing.assert_array_equal(g, _numpy_cutmix(box, want))
    np.testing.assert_array_equal(got[0][b - 1], image[b - 1])  # no box: unchanged
    assert np.sum(np.asarray(got[2])[2] == 255) == np.sum(box[2] & (pseudo[1] == 255))


def _deterministic_setup(allspark: bool):
    """The tiny model without dropout or stochastic depth, its optimiser and a fresh state (33 px)."""
    cfg = ModelConfig(backbone=dataclasses.replace(TINY.backbone, drop_path_rate=0.0),
                      num_classes=3, allspark_heads=2, decoder_dim=16, head_dropout=0.0,
                      attn_drop=0.0,
                      proj_drop=0.0, allspark=allspark)
    model = AllSparkSegmentor(cfg)
    tx, _ = optimizer.create_optimizer(OPTIM, total_steps=10)
    return model, tx, state_lib.create_train_state(model, tx, jax.random.key(0), 33, ema=False)


def _random_batch(rng, b: int) -> dict:
    """A (b, 33, 33) batch of random images and masks; the student sees the weak view."""
    image_u = rng.normal(size=(b, 33, 33, 3)).astype(np.float32)
    return {"image_l": rng.normal(size=(b, 33, 33, 3)).astype(np.float32),
            "mask_l": rng.integers(0, 3, (b, 33, 33)).astype(np.int32),
            "image_u_w": image_u, "image_u_s": image_u, "pad_u": np.zeros((b, 33, 33), bool)}


def test_semi_step_with_cutmix_learns_the_partners_pseudo_labels():
    """The step's targets and loss_u equal a direct construction: the teacher's argmax on each
    weak view, mixed in numpy, against the student's logits on the numpy-mixed student view."""
    model, tx, state = _deterministic_setup(allspark=False)
    rng = np.random.default_rng(4)
    batch = _random_batch(rng, 3)
    batch["image_u_s"] = rng.normal(size=(3, 33, 33, 3)).astype(np.float32)
    batch["cutmix_u"] = _boxes(3, 33, rng)
    teacher = model.apply(state.variables(), batch["image_u_w"], mode="teacher")
    want_pseudo = _numpy_cutmix(batch["cutmix_u"], np.argmax(np.asarray(teacher), -1))
    x = np.concatenate([batch["image_l"], _numpy_cutmix(batch["cutmix_u"], batch["image_u_s"])])
    logits, _ = model.apply(state.variables(), x, mode="train", mutable=["batch_stats"])
    want_loss_u = losses.cross_entropy(logits[3:], want_pseudo)
    step = train_step.make_train_step(model, tx, train_config(), use_memory=False,
                                      with_outputs=True, method=method("semi"))
    _, out = step(state, batch)
    np.testing.assert_array_equal(out["pseudo_label"], want_pseudo)
    np.testing.assert_allclose(out["loss_u"], want_loss_u, rtol=1e-5)


def test_allspark_step_groups_the_teacher_and_student_keys():
    """train.key_group_size reaches both passes: the step's losses equal the model's own teacher and
    pre-warm-up student passes with that grouping (a whole-batch student would differ)."""
    model, tx, state = _deterministic_setup(allspark=True)
    batch = _random_batch(np.random.default_rng(5), 4)
    x = np.concatenate([batch["image_l"], batch["image_u_w"]])

    @functools.partial(jax.jit, static_argnums=0)
    def loss_u(student_groups):
        teacher = model.apply(state.variables(), batch["image_u_w"], mode="teacher",
                              key_group_size=2)
        logits, _ = model.apply(state.variables(), x, mode="train", teacher_logits=teacher,
                                key_group_size=student_groups, mutable=["batch_stats", "memory"])
        return losses.cross_entropy(logits[4:], jnp.argmax(teacher, -1))

    grouped, whole = float(loss_u(2)), float(loss_u(None))
    assert abs(whole - grouped) > 1e-4
    step = train_step.make_train_step(model, tx, train_config(key_group_size=2), use_memory=False,
                                      method=method())
    _, out = step(state, batch)  # donates the state
    np.testing.assert_allclose(out["loss_u"], grouped, rtol=1e-5)
