"""The learning benchmark: its rows are valid configs, and it runs end to end in a tiny setting
(one seed, a few steps; no assertion on which method wins)."""
import json
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

import run_config
from allspark_jax import errors
from allspark_jax import config as config_lib
from allspark_jax.config import checks
from allspark_jax.experiments import learning


def test_every_row_is_a_valid_run_of_its_method():
    base = config_lib.load_config("configs/learning.py")
    plan = types.SimpleNamespace(steps_per_epoch=5)
    for row in learning.rows_for(["supervised", "semi", "allspark"]):
        config = learning.row_config(base, row, 7, all_labeled="/data/all/labeled.txt",
                                     total_steps=280, plan_fn=lambda c: plan)
        method, overrides = learning.ROWS[row]
        assert (config.method, config.seed) == (method, 7)
        assert config.train.num_train_steps == 280
        if method == "supervised":
            assert config.train.epochs == 56  # 280 steps of 5 per epoch
        # the memory's warm-up is AllSpark's: the other methods' rows keep the default
        assert config.train.warmup_epoch == (2 if method == "allspark" else 5)
        # the branch option: its row's alone (the others predict as the release)
        unlabeled = row in ("allspark_unlabeled_branch", "allspark_unlabeled_teacher")
        assert config.model.inference_branch == ("unlabeled" if unlabeled else "labeled")
        assert config.train.teacher_branch == (
            "unlabeled" if row == "allspark_unlabeled_teacher" else "labeled")
        # --branches scores the branches other than the row's own
        others = ("labeled", "memory") if unlabeled else ("memory", "unlabeled")
        assert learning.inspected_branches(config) == others
    assert learning.rows_for(["allspark"]) == ["allspark", "allspark_ema", "allspark_strong_cutmix",
                                               "allspark_unlabeled_branch",
                                               "allspark_unlabeled_teacher"]
    assert learning.rows_for(["allspark"], extensions=False) == ["allspark"]
    assert learning.rows_for(["supervised"], ceiling=False) == ["supervised"]
    # --rows: exactly the named rows, in table order
    assert learning.named_rows(["allspark_unlabeled_branch", "allspark"]) == [
        "allspark", "allspark_unlabeled_branch"]
    for bad in (["allspark", "allspark"], ["allspark_teacher"], []):
        with pytest.raises(learning.app.UsageError, match="expected distinct names among "
                           "supervised, supervised_all_labels"):
            learning.named_rows(bad)
    assert learning.summarize([1.0, 2.0, 3.0]) == (2.0, 1.0)


def test_unimatch_v2_rows_take_the_demo_recipe_and_the_optimiser_row_its_optimiser():
    base = config_lib.load_config("configs/learning.py")
    plan = types.SimpleNamespace(steps_per_epoch=5)
    rows = learning.rows_for(["supervised", "unimatch_v2", "unimatch_v2_allspark"], ceiling=False)
    assert rows == ["supervised", "unimatch_v2", "unimatch_v2_allspark", "supervised_adamw"]
    assert "supervised_adamw" not in learning.rows_for(["supervised", "semi"])
    configs = {row: learning.row_config(base, row, 3, all_labeled="/x", total_steps=280,
                                        plan_fn=lambda c: plan) for row in rows}
    recipe = config_lib.load_config("configs/demo.py:unimatch_v2")
    for row in ("unimatch_v2", "unimatch_v2_allspark"):
        c = configs[row]
        assert (c.method, c.train.teacher, c.data.student_view) == (row, "ema", "strong")
        assert c.optim.to_dict() == recipe.optim.to_dict()
        assert c.train.ema_decay == recipe.train.ema_decay
        assert c.model.backbone.to_dict() == base.model.backbone.to_dict()  # the task's model
    assert configs["unimatch_v2_allspark"].train.warmup_epoch == base.train.warmup_epoch
    adamw = configs["supervised_adamw"]
    assert adamw.method == "supervised" and adamw.optim.to_dict() == recipe.optim.to_dict()
    assert adamw.data.to_dict() == configs["supervised"].data.to_dict()
    # a base of the recipe keeps its own settings, a command-line rate included
    own = config_lib.load_config("configs/learning.py:unimatch_v2")
    own.optim.lr = 0.0123
    assert learning.row_config(own, "unimatch_v2", 0, all_labeled="/x", total_steps=280,
                               plan_fn=lambda c: plan).optim.lr == 0.0123


def test_unknown_method_is_a_usage_error():
    with pytest.raises(learning.app.UsageError, match=r"--methods=mean_teacher: expected"):
        learning.rows_for(["mean_teacher"])


def test_branches_need_the_training_token_grid():
    base = config_lib.load_config("configs/learning.py")
    learning.check_branches(base)  # 64 px crops, 60 px centre crops: both 2 x 2 tokens
    base.eval.crop_size = 32
    with pytest.raises(learning.app.UsageError, match=r"config.eval.crop_size=32 gives a stage-4 "
                       r"grid of 1 x 1 tokens, config.data.crop_size=64 2 x 2"):
        learning.check_branches(base)
    base.eval.mode = "original"
    with pytest.raises(learning.app.UsageError, match="config.eval.mode='original' feeds whole"):
        learning.check_branches(base)
    # DINOv2: the grid of the evaluated input (60 px crops resized to 56, as UniMatch V2 evaluates)
    dinov2 = config_lib.load_config("configs/learning.py:dinov2")
    learning.check_branches(dinov2)  # 56 px crops: 4 x 4 tokens both
    dinov2.data.crop_size = 70
    with pytest.raises(learning.app.UsageError, match=r"config.eval.crop_size=60 gives a token "
                       r"grid of 4 x 4 tokens, config.data.crop_size=70 5 x 5"):
        learning.check_branches(dinov2)


def test_end_to_end_one_seed(tmp_path):
    """One seed, 4 steps a run, every run's encoder from a 2-step source-task model."""
    out, workdir = tmp_path / "out.json", tmp_path / "work"
    flags = run_config.cli_flags(train__epochs=1, eval_every_steps=10**9,
                                 checkpoint_every_steps=10**9, learning__pretrain_steps=2,
                                 learning__pretrain_num_classes=5, learning__pretrain_num_images=8)
    cmd = [sys.executable, "-m", "allspark_jax.experiments.learning",
           "--config", "configs/learning.py", "--seeds", "0",
           "--methods", "supervised,allspark", "--noextensions", "--branches", "--json", str(out),
           "--workdir", str(workdir), *flags]
    proc = subprocess.run(cmd, cwd=run_config.ROOT, env=run_config.subprocess_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert list(data["results"]) == ["supervised", "supervised_all_labels", "allspark"]
    for r in data["results"].values():
        assert len(r["miou"]) == 1 and 0.0 <= r["mean"] <= 100.0 and r["std"] == 0.0
        assert r["mean"] == r["miou"][0] and r["steps"] == 4  # 16 unlabeled // 4, one epoch
        assert len(r["cpu_seconds"]) == 1 and r["cpu_seconds"][0] > 0
    assert set(data["summary"]) == {"allspark_minus_supervised", "ceiling_minus_supervised"}
    # --branches: the AllSpark run also scored through its memory and unlabeled branches
    branches = data["results"]["allspark"]["branches"]
    assert set(branches) == {"memory", "unlabeled"} and "branches" not in data["results"]["supervised"]
    for b in branches.values():
        assert len(b["miou"]) == 1 and 0.0 <= b["mean"] <= 100.0 and b["mean"] == b["miou"][0]
    assert "  branch memory" in proc.stdout and "  branch unlabeled" in proc.stdout
    assert data["config"]["data"]["synthetic"]["num_train"] == 22 and data["seeds"] == [0]
    assert data["config"]["learning"]["pretrain_steps"] == 2 and data["cpu_seconds"] > 0
    assert "supervised_all_labels" in proc.stdout and "mean" in proc.stdout
    # the source task ran, and its encoder is a mit_bX.pth-style state dict the runs started from
    pretrain = data["pretrain"]
    assert pretrain["steps"] == 2 and 0.0 <= pretrain["miou"] <= 100.0
    assert pretrain["path"] == str(workdir / "pretrain" / "encoder.npz")
    with np.load(pretrain["path"]) as f:
        keys = set(f.files)
    assert "patch_embed1.proj.weight" in keys
    assert not any(k.startswith(("backbone.", "decoder.", "head.")) for k in keys)
    assert f"every run's encoder starts from {pretrain['path']}" in proc.stdout


def test_the_tiny_dinov2_end_to_end(tmp_path):
    """configs/learning.py:dinov2 in process: the source task's DINOv2 encoder is written in
    facebookresearch's names and the run starts from it (one seed, AllSpark alone, 2 steps, 28 px
    crops; the command line around it is the MiT test's above), and UniMatch V2's recipe with
    AllSpark on it."""
    base = config_lib.load_config("configs/learning.py:dinov2")
    for key, value in {"data.synthetic.num_train": 14, "data.synthetic.num_labeled": 6,
                       "data.synthetic.num_val": 4, "data.synthetic.size": 40, "data.crop_size": 28,
                       "data.batch_size": 4, "eval.crop_size": 28, "train.epochs": 1,
                       "train.progress_bar": False, "learning.pretrain_steps": 2,
                       "learning.pretrain_num_classes": 5,
                       "learning.pretrain_num_images": 8}.items():
        checks.set_value(base, key, value)
    config_lib.validate(base)
    learning.validate_learning(base)
    printed = []
    ran = learning.run_benchmark(base, seeds=[0], rows=["allspark", "unimatch_v2_allspark"],
                                 workdir=str(tmp_path), print_fn=printed.append)
    for r in ran["results"].values():
        assert r["steps"] == 2 and len(r["miou"]) == 1 and 0.0 <= r["mean"] <= 100.0
    assert len(ran["results"]["unimatch_v2_allspark"]["miou_ema"]) == 1  # its EMA teacher too
    pretrain = ran["pretrain"]
    assert pretrain["steps"] == 2 and pretrain["num_classes"] == 5
    with np.load(pretrain["path"]) as f:
        keys = set(f.files)
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.3.attn.qkv.weight",
            "norm.weight"} <= keys
    assert not any(k.startswith(("backbone.", "head.")) for k in keys)
    assert any(f"every run's encoder starts from {pretrain['path']}" in p for p in printed)


def test_unreadable_encoder_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / "encoder.npz"
    bad.write_bytes(b"not a zip")
    flags = run_config.cli_flags(train__epochs=1, learning__pretrain_steps=0,
                                 model__pretrained=str(bad))
    cmd = [sys.executable, "-m", "allspark_jax.experiments.learning",
           "--config", "configs/learning.py", "--seeds", "0",
           "--methods", "supervised", "--noceiling", "--workdir", str(tmp_path / "work"), *flags]
    proc = subprocess.run(cmd, cwd=run_config.ROOT, env=run_config.subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {bad}: not an .npz (zip) archive; expected a state dict written by numpy.savez "
        "(name -> array)"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_source_task_trains_at_its_own_rate(tmp_path, monkeypatch):
    """learning.pretrain_lr sets the source task's rate (every module alike), and only there: with
    no source task to train the key is refused."""
    base = config_lib.load_config("configs/learning.py")
    base.data.synthetic.size = 16
    base.learning.update(pretrain_steps=2, pretrain_num_images=8, pretrain_lr=0.02)
    base.optim.update(lr=0.001, lr_multi=10.0)
    seen = []

    class Stop(Exception):
        pass

    def fake_run(config, run_dir):
        seen.append(config)
        raise Stop

    monkeypatch.setattr(learning, "_train_run", fake_run)
    with pytest.raises(Stop):
        learning.pretrain_encoder(base, str(tmp_path), print_fn=lambda *a: None)
    assert (seen[0].optim.lr, seen[0].optim.lr_multi, seen[0].method) == (0.02, 1.0, "supervised")
    base.learning.pretrain_steps = 0
    with pytest.raises(errors.ConfigError, match=r"learning\.pretrain_lr.*pretrain_steps 0"):
        learning.validate_learning(base)


def test_the_regime_task_is_as_documented():
    """configs/learning.py:regime: the task's documented values, the original task's model,
    schedule and source task otherwise, and the rule its rendering seed was chosen by."""
    from allspark_jax.configs import learning as learning_config
    from allspark_jax.data import synthetic
    config = config_lib.load_config("configs/learning.py:regime")
    config_lib.validate(config)
    learning.validate_learning(config)
    s = config.data.synthetic
    assert (config.data.num_classes, config.model.num_classes) == (7, 7)
    assert (s.seed, s.num_train, s.num_labeled, s.num_val, s.size) == (29, 290, 10, 64, 80)
    assert (s.colours, s.max_objects, s.distractors, s.hue_jitter) == (0, 4, 0, 0.05)
    assert s.seed != config.learning.pretrain_seed
    # the original task's 280 steps: 35 unlabeled batches an epoch, 8 epochs
    assert (s.num_train - s.num_labeled) // config.data.batch_size * config.train.epochs == 280
    original = config_lib.load_config("configs/learning.py").to_dict()
    regime = config.to_dict()
    for part in (original, regime):
        del part["data"]["synthetic"], part["data"]["num_classes"], part["model"]["num_classes"]
    assert regime == original
    # the seed: the first from 26 whose labeled images hold every object class in >= 3 images
    style = config_lib.synthetic_style(config)

    def fewest_labeled_images_of_a_class(seed):
        labels = [synthetic.render(i, "train", s.size, 7, seed, style)[1]
                  for i in range(s.num_labeled)]
        return min(sum(bool((lab == k).any()) for lab in labels) for k in range(1, 7))

    assert fewest_labeled_images_of_a_class(29) >= 3
    assert all(fewest_labeled_images_of_a_class(seed) < 3 for seed in (26, 27, 28))
    assert learning_config.REGIME_TASK["seed"] == 29


@pytest.mark.parametrize("arg,method,encoder", [
    ("regime", "allspark", "mit"), ("supervised,regime", "supervised", "mit"),
    ("regime,semi", "semi", "mit"), ("dinov2,regime", "allspark", "dinov2"),
    ("unimatch_v2_allspark,regime", "unimatch_v2_allspark", "mit")])
def test_the_task_token_combines_with_method_and_encoder(arg, method, encoder):
    from allspark_jax.configs import learning as learning_config
    config = config_lib.load_config(f"configs/learning.py:{arg}")
    task, rest = learning_config.task_arg(arg)
    assert task == "regime" and "regime" not in rest.split(",")
    plain = config_lib.load_config(f"configs/learning.py:{rest}")
    assert (config.method, config.model.encoder, config.data.num_classes) == (method, encoder, 7)
    assert config.data.synthetic.seed == 29 and plain.data.synthetic.seed == 0
    assert config.optim.to_dict() == plain.optim.to_dict()
    config_lib.validate(config)


@pytest.mark.parametrize("arg", ["", "supervised", "semi", "allspark", "unimatch_v2", "dinov2",
                                 "supervised,dinov2", "supervised,regime"])
def test_every_argument_gives_a_valid_config(arg):
    """A method that reads no teacher (supervised) keeps train.ema_decay's default."""
    config = config_lib.load_config(f"configs/learning.py:{arg}" if arg else "configs/learning.py")
    config_lib.validate(config)
    if config.method == "allspark":
        assert config.train.ema_decay == 0.99  # the EMA row's teacher


@pytest.mark.parametrize("arg,message", [
    ("regime,regime", r"^configs/learning.py:regime,regime: 'regime' is given twice; give it once$"),
    ("regime,foo", r"^configs/learning.py:regime,foo: unknown method or encoder 'foo'; .* or an "
                   r"encoder \(mit, dinov2\); or the task 'regime'$"),
    ("semi,regime,semi", r"^configs/learning.py:semi,regime,semi: 'semi' is a second method; "
                         r"give one$")])
def test_bad_task_arguments_are_named(arg, message):
    with pytest.raises(ValueError, match=message):
        config_lib.load_config(f"configs/learning.py:{arg}")


def test_the_regime_rows_keep_the_task_and_its_source_task_the_original_style(tmp_path,
                                                                              monkeypatch):
    from allspark_jax.data import synthetic
    base = config_lib.load_config("configs/learning.py:regime")
    plan = types.SimpleNamespace(steps_per_epoch=35)
    for row in learning.rows_for(["supervised", "semi", "allspark", "unimatch_v2"]):
        config = learning.row_config(base, row, 0, all_labeled="/x", total_steps=280,
                                     plan_fn=lambda c: plan)
        assert config.data.synthetic.to_dict() == base.data.synthetic.to_dict(), row
        assert config.data.num_classes == 7, row
    base.data.synthetic.update(size=16, num_val=2)
    base.learning.update(pretrain_steps=2, pretrain_num_images=8)

    class Stop(Exception):
        pass

    def fake_run(config, run_dir):
        raise Stop

    monkeypatch.setattr(learning, "_train_run", fake_run)
    with pytest.raises(Stop):
        learning.pretrain_encoder(base, str(tmp_path), print_fn=lambda *a: None)
    with open(tmp_path / "pretrain" / "data" / "SegmentationClass" / "train_00003.png", "rb") as f:
        written = np.asarray(Image.open(f))
    np.testing.assert_array_equal(written, synthetic.render(3, "train", 16, 9, 1000)[1])
