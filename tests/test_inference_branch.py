"""`model.inference_branch` (the AllSpark module's branch that evaluates and predicts) and
`train.teacher_branch` (the one that makes the teacher's pseudo-labels): this project's extension;
the release's is 'labeled', the default of both.

The training step's pseudo-labels are the teacher branch's argmax (the module in "eval" mode with
that branch; with key groups of 1 the release's teacher pass is its "eval" mode too) whatever the
inference branch, the evaluator and predict read the inference branch, and validation refuses what
they cannot do."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import run_config
from allspark_jax import checkpoints, inspection, method as method_lib, optimizer
from allspark_jax import config as config_lib, state as state_lib, train_step
from allspark_jax.configs import default
from allspark_jax.errors import CheckpointError, ConfigError
from allspark_jax.evaluation import evaluator
from allspark_jax.models.allspark import BRANCHES, teacher_branch
from allspark_jax.models.mit import MiTConfig
from allspark_jax.models.segmentor import (AllSparkSegmentor, ModelConfig, build_model,
                                           init_variables, teacher_model)

S, B, K = 33, 2, 3
TINY = ModelConfig(backbone=MiTConfig(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1),
                                      num_heads=(1, 2, 3, 4), drop_path_rate=0.1),
                   num_classes=K, allspark_heads=2, decoder_dim=16, head_dropout=0.1,
                   attn_drop=0.1, proj_drop=0.1, allspark=True)
SGD = ml_collections.ConfigDict(dict(name="sgd", lr=0.01, lr_multi=10.0, momentum=0.9,
                                     weight_decay=1e-4, poly_power=0.9))
ADAMW = ml_collections.ConfigDict(dict(name="adamw", lr=1e-3, lr_multi=10.0, momentum=0.9,
                                       betas=(0.9, 0.999), weight_decay=0.01, poly_power=0.9))


def train_config(**overrides):
    # key groups of 1: the release's teacher pass ('labeled') is then its "eval" mode too
    config = default.get_config().train  # teacher_branch 'labeled', the release's
    config.update(loss_x="ce", loss_groups=1, ema_decay=0.9, conf_thresh=0.0,
                  loss_u_ignore_padding=False, key_group_size=1)
    config.update(overrides)
    return config


def batch(rng, two_views: bool = False) -> dict:
    def images():
        return rng.normal(size=(B, S, S, 3)).astype(np.float32)
    out = {"image_l": images(), "mask_l": rng.integers(0, K, (B, S, S)).astype(np.int32),
           "image_u_w": images(), "pad_u": np.zeros((B, S, S), bool)}
    if two_views:
        out["image_u_s1"], out["image_u_s2"] = images(), images()
    else:
        out["image_u_s"] = out["image_u_w"]
    return out


def branch_logits(branch: str, variables, x, mode: str = "eval", key_group_size=None):
    """The tiny model's logits through `branch` (jitted, as the step's pass)."""
    model = AllSparkSegmentor(TINY, branch=branch)
    fn = jax.jit(lambda v, x: model.apply(v, x, mode=mode, key_group_size=key_group_size))
    return np.asarray(fn(variables, x))


def test_teacher_branch_rule():
    assert [teacher_branch(b, True) for b in BRANCHES] == list(BRANCHES)
    assert [teacher_branch(b, False) for b in BRANCHES] == ["labeled", "labeled", "unlabeled"]
    with pytest.raises(ValueError, match="branch must be one of"):
        teacher_branch("teacher", True)
    model = AllSparkSegmentor(TINY)
    assert teacher_model(model, "labeled", True) is model  # the release's teacher: the model itself
    assert teacher_model(model, "memory", False).branch == "labeled"
    assert teacher_model(model, "unlabeled", False).branch == "unlabeled"
    # the inference branch is not the teacher's
    assert teacher_model(model.clone(branch="unlabeled"), "labeled", True).branch == "labeled"


@pytest.mark.parametrize("branch,use_memory,want", [
    ("labeled", True, "labeled"),  # the release's
    ("unlabeled", False, "unlabeled"),
    ("memory", True, "memory"),
    ("memory", False, "labeled"),  # before the warm-up the memory is not read
])
def test_the_steps_pseudo_labels_are_the_branchs_argmax(branch, use_memory, want):
    # the model predicts (evaluates) through another branch: the teacher pass takes its own
    model = AllSparkSegmentor(TINY, branch="unlabeled" if branch == "labeled" else "labeled")
    tx, _ = optimizer.create_optimizer(SGD, total_steps=10)
    state = state_lib.create_train_state(model, tx, jax.random.key(0), S, ema=False)
    data = batch(np.random.default_rng(1))
    variables = jax.device_get(state.variables())  # the memory included (random, as initialised)
    expected = branch_logits(want, variables, data["image_u_w"]).argmax(-1)
    release = branch_logits("labeled", variables, data["image_u_w"], mode="teacher",
                            key_group_size=1).argmax(-1)
    if want != "labeled":  # the option changes the pseudo-labels
        assert np.mean(expected != release) > 0.01
    method = method_lib.resolve("allspark", teacher="online", student_view="weak", cutmix_prob=0)
    step = train_step.make_train_step(model, tx, train_config(teacher_branch=branch),
                                      use_memory=use_memory, method=method, with_outputs=True)
    _, out = step(state, data)
    np.testing.assert_array_equal(out["pseudo_label"], expected)
    # the notebooks' teacher pass is the step's
    np.testing.assert_array_equal(
        inspection.teacher_outputs(model, variables, data["image_u_w"], key_group_size=1,
                                   branch=branch, use_memory=use_memory)[1], expected)


@pytest.mark.parametrize("name", ["allspark", "unimatch_v2_allspark"])
def test_the_ema_teacher_predicts_through_the_unlabeled_branch(name):
    """The EMA teacher (`allspark` with train.teacher 'ema', and UniMatch V2's recipe) labels
    through the branch too: its logits are the EMA weights' through "unlabeled"."""
    model = AllSparkSegmentor(TINY)
    uv2 = name == "unimatch_v2_allspark"
    tx, _ = optimizer.create_optimizer(ADAMW if uv2 else SGD, total_steps=10)
    state = state_lib.create_train_state(model, tx, jax.random.key(0), S, ema=True)
    # an EMA teacher apart from the student: its weights moved away
    state = state.replace(ema_params=jax.tree.map(lambda p: p * 1.1, state.ema_params))
    data = batch(np.random.default_rng(2), two_views=uv2)
    teacher = jax.device_get(state.variables(teacher=True))
    assert "memory" not in teacher
    want = branch_logits("unlabeled", teacher, data["image_u_w"])
    release = branch_logits("labeled", teacher, data["image_u_w"], mode="teacher",
                            key_group_size=1)
    assert np.mean(want.argmax(-1) != release.argmax(-1)) > 0.01
    method = method_lib.resolve(name, teacher="ema", student_view="strong" if uv2 else "weak",
                                cutmix_prob=0)
    step = train_step.make_train_step(model, tx, train_config(teacher_branch="unlabeled"),
                                      use_memory=True, method=method, with_outputs=True)
    _, out = step(state, data)
    if uv2:
        np.testing.assert_allclose(out["teacher_logits"], want, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(out["pseudo_label"][:B], want.argmax(-1))
    else:
        np.testing.assert_array_equal(out["pseudo_label"], want.argmax(-1))


@pytest.mark.parametrize("branch", ["unlabeled", "memory"])
def test_the_evaluator_and_predict_read_the_key(branch, tmp_path):
    """`evaluator.make_predictor` (evaluation during training, `--mode eval`, `--mode predict`,
    the notebooks) predicts through the config's branch; a weight file loads into that model."""
    from allspark_jax.weights import release_files
    config = run_config.tiny_config(model__inference_branch=branch)
    config_lib.validate(config)
    model = build_model(config)
    assert model.branch == branch and build_model(run_config.tiny_config()).branch == "labeled"
    variables = jax.device_get(jax.jit(lambda r: init_variables(model, r, config.data.crop_size))(
        jax.random.key(3)))
    predictor = evaluator.make_predictor(config)
    assert predictor.model.branch == branch
    rng = np.random.default_rng(4)
    images = [predictor.prepare(rng.normal(size=(36, 40, 3)).astype(np.float32))[0]
              for _ in range(3)]
    preds = predictor.predict(variables, images)
    x = np.stack(images)  # 28 x 28 centre crops
    want = np.asarray(jnp.argmax(model.apply(variables, x, mode="eval"), -1))
    release = np.asarray(jnp.argmax(model.clone(branch="labeled").apply(variables, x,
                                                                        mode="eval"), -1))
    np.testing.assert_array_equal(np.stack(preds), want)
    assert np.mean(want != release) > 0.01
    # --mode eval / predict with an official weight file: the model of the config's branch
    path = str(tmp_path / "official.pth")
    release_files.save_official_checkpoint(variables, path)
    loaded, info = checkpoints.load_inference_variables(config, None, path)
    assert info["model"].branch == branch
    np.testing.assert_array_equal(np.stack(evaluator.make_predictor(config, info["model"]).predict(
        loaded["student"], images)), want)


def test_a_model_without_allspark_has_no_branch_to_choose():
    hf = run_config.ROOT + "/tests/data/hf_segformer_tiny"  # a SegFormer: no AllSpark module
    config = run_config.tiny_config(model__inference_branch="unlabeled")
    with pytest.raises(CheckpointError, match=r"hf_segformer_tiny: a model without the AllSpark "
                       r"module has no branch .* config.model.inference_branch='unlabeled': "
                       r"expected 'labeled'"):
        checkpoints.load_inference_variables(config, None, hf)


def _error(**overrides) -> str:
    with pytest.raises(ConfigError) as e:
        config_lib.validate(run_config.tiny_config(**overrides))
    assert "\n" not in str(e.value)
    return str(e.value)


def test_validation():
    assert run_config.tiny_config().model.inference_branch == "labeled"  # the release's
    for branch in BRANCHES:
        config_lib.validate(run_config.tiny_config(model__inference_branch=branch))
    config_lib.validate(run_config.tiny_config(method="unimatch_v2_allspark",
                                               model__inference_branch="unlabeled"))
    assert _error(model__inference_branch="teacher") == (
        "config.model.inference_branch='teacher': expected one of 'labeled', 'memory', "
        "'unlabeled'")
    # a method without the AllSpark module does not read it
    assert _error(method="semi", model__inference_branch="unlabeled").startswith(
        "config.model.inference_branch='unlabeled': expected 'labeled' (its configs/default.py "
        "value) with method 'semi': only AllSpark reads it")
    # 'memory': the training crop's token grid at evaluation, and a memory in the teacher
    assert "eval.mode='original' feeds whole images" in _error(
        model__inference_branch="memory", eval__mode="original")
    assert _error(model__inference_branch="memory", eval__crop_size=64).endswith(
        "config.eval.crop_size=64 gives a stage-4 grid of 2 x 2 tokens, config.data.crop_size=32 "
        "1 x 1: the memory branch needs the training crop's grid")
    for overrides in ({"train__teacher": "ema"}, {"method": "unimatch_v2_allspark"}):
        for key in ("model__inference_branch", "train__teacher_branch"):
            name = key.replace("__", ".")
            assert _error(**{key: "memory"}, **overrides).startswith(
                f"config.{name}='memory': expected 'labeled' or 'unlabeled' with "
                "train.teacher='ema' (the EMA teacher has no Semantic Memory")
    # the teacher's branch: any with the online teacher (training crops), refused without AllSpark
    assert run_config.tiny_config().train.teacher_branch == "labeled"  # the release's
    for branch in BRANCHES:
        config_lib.validate(run_config.tiny_config(train__teacher_branch=branch,
                                                   eval__mode="original"))
    assert _error(train__teacher_branch="student") == (
        "config.train.teacher_branch='student': expected one of 'labeled', 'memory', 'unlabeled'")
    assert _error(method="semi", train__teacher_branch="unlabeled").startswith(
        "config.train.teacher_branch='unlabeled': expected 'labeled' (its configs/default.py "
        "value) with method 'semi': only AllSpark reads it")


def test_the_evaluation_benchmark_refuses_the_memory_branch():
    """`python -m allspark_jax.benchmark --what eval|predict` times whole images, which the memory
    branch cannot predict: refused before anything runs."""
    from allspark_jax.benchmark import measure
    config = run_config.tiny_config(model__inference_branch="memory")
    for what in (["eval"], ["predict"]):
        with pytest.raises(ConfigError, match=r"^config.model.inference_branch='memory': expected "
                           r"'labeled' or 'unlabeled' for the 'eval' / 'predict' benchmarks"):
            measure.run(config, what=what)
