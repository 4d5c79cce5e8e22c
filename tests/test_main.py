"""main.py end to end on the (shortened) demo config: train, eval, predict, and clear flag errors;
a custom dataset and a Hugging Face SegFormer checkpoint through the same commands; the console."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import run_config

MAIN = os.path.join(run_config.ROOT, "main.py")
DEMO = "configs/demo.py"
HF_SEGFORMER = os.path.join(run_config.ROOT, "tests", "data", "hf_segformer_tiny")  # 5 classes
# A C++ log line of TensorFlow / XLA / absl ("I0000 00:00:17958.123 4242 port.cc:153] ...") and
# absl's notice before its C++ logging starts.
NATIVE_LOG = re.compile(r"^[IWEF]\d{4} [\d:. ]+\d+ [\w./-]+\.cc:\d+\]|absl::InitializeLog",
                        re.MULTILINE)


def run_main(*args, timeout=300, quiet_env=True, split=False):
    """main.py's (return code, stdout + stderr), or (rc, stdout, stderr) with `split`.

    `quiet_env=False` drops TF_CPP_MIN_LOG_LEVEL from the environment, as on a user's machine.
    """
    env = run_config.subprocess_env()
    if not quiet_env:
        env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    proc = subprocess.run([sys.executable, MAIN, *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=run_config.ROOT)
    if split:
        return proc.returncode, proc.stdout, proc.stderr
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("main_train"))
    rc, stdout, stderr = run_main("--config", DEMO, "--workdir", workdir, *run_config.cli_flags(),
                                  quiet_env=False, split=True)
    assert rc == 0, (stdout + stderr)[-5000:]
    return workdir, stdout, stderr


def test_train_writes_checkpoints_logs_and_results(trained):
    workdir, stdout, stderr = trained
    names = set(os.listdir(workdir))
    assert {"checkpoints", "checkpoints_best", "eval_results.json", "config.json",
            "synthetic_data", "main.INFO"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["6", "8"]
    with open(os.path.join(workdir, "main.INFO")) as f:
        log = f.read()
    for key in ("train/loss=", "train/lr_encoder=", "train/lr_rest=", "train/images_per_second=",
                "eval/miou="):
        assert key in log, key
    assert "mIoU" in stdout and "diamond_4" in stdout  # the per-class tables


def test_console_is_quiet(trained):
    """No TensorFlow / XLA C++ lines and no absl log lines on the console (they are in main.INFO);
    the progress bar shows step, epoch, losses, images/s and the ETA."""
    _, stdout, stderr = trained
    for stream in (stdout, stderr):
        assert not NATIVE_LOG.search(stream), NATIVE_LOG.search(stream).group(0)
        assert "train/loss=" not in stream
    last = stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert re.search(r"train: 100%.* 8/8 \[.*<00:00, .*epoch=2\.00, loss=[\d.]+, "
                     r"loss_x=[\d.]+, loss_u=[\d.]+, img/s=[\d.]+\]", last), last


def test_verbose_shows_the_logs(trained):
    workdir, _, _ = trained
    rc, out = run_main("--config", DEMO, "--workdir", workdir, "--verbose", *run_config.cli_flags(),
                       quiet_env=False)  # the run is complete: it starts and returns
    assert rc == 0, out[-5000:]
    assert "JAX process 0 / 1" in out and "Resumed from step 8" in out


def test_eval_reproduces_the_logged_miou(trained):
    workdir = trained[0]
    rc, out = run_main("--config", DEMO, "--workdir", workdir, "--mode", "eval",
                       "--checkpoint", "latest", *run_config.cli_flags())
    assert rc == 0, out[-5000:]
    with open(os.path.join(workdir, "eval_results.json")) as f:
        logged = json.load(f)["8"]["student"]
    with open(os.path.join(workdir, "eval_latest.json")) as f:
        evaluated = json.load(f)
    assert evaluated["step"] == 8
    assert evaluated["results"]["student"]["miou"] == pytest.approx(logged["miou"], abs=1e-9)
    assert evaluated["results"]["student"]["iou"] == pytest.approx(logged["iou"], abs=1e-9)
    assert "diamond_4" in out  # the table names the classes


def test_predict_writes_palette_masks_and_overlays(trained, tmp_path):
    workdir = trained[0]
    images = os.path.join(workdir, "synthetic_data", "JPEGImages")
    one = os.path.join(images, "val_00000.jpg")
    out_dir = str(tmp_path / "pred")
    rc, out = run_main("--config", DEMO, "--workdir", workdir, "--mode", "predict",
                       "--checkpoint", "best", "--inputs", one, "--output_dir", out_dir,
                       *run_config.cli_flags(**{"eval.mode": "original"}))
    assert rc == 0, out[-5000:]
    mask = Image.open(os.path.join(out_dir, "val_00000.png"))
    image = Image.open(one)
    assert mask.mode == "P" and mask.size == image.size
    assert np.asarray(mask).max() < 5
    overlay = Image.open(os.path.join(out_dir, "val_00000_overlay.jpg"))
    assert overlay.size == image.size


CUSTOM_IGNORE = 200


@pytest.fixture(scope="module")
def custom_root(tmp_path_factory):
    """The tiny run's images as a custom dataset: palette masks (palette.txt), ignore value 200."""
    from allspark_jax.data import synthetic
    root = str(tmp_path_factory.mktemp("custom_data"))
    o = run_config.OVERRIDES
    synthetic.write_dataset(root, num_train=o["data.synthetic.num_train"],
                            num_val=o["data.synthetic.num_val"], size=o["data.synthetic.size"],
                            num_classes=5, num_labeled=o["data.synthetic.num_labeled"],
                            layout="custom", ignore_index=CUSTOM_IGNORE, palette_masks=True)
    return root


def custom_flags(root, **extra):
    """The tiny run's flags on the custom dataset at `root`."""
    return run_config.cli_flags(**{
        "data.name": "custom", "data.root": root, "data.split": "labeled.txt",
        "data.unlabeled_split": "unlabeled.txt", "data.val_split": "val.txt",
        "data.custom.class_names": "class_names.txt", "data.custom.palette": "palette.txt",
        "data.custom.ignore_index": CUSTOM_IGNORE, **extra})


def test_custom_dataset_train_eval_predict(custom_root, tmp_path):
    workdir = str(tmp_path / "run")
    rc, out = run_main("--config", DEMO, "--workdir", workdir, *custom_flags(custom_root),
                       "--config.train.num_train_steps=4")
    assert rc == 0, out[-5000:]
    assert "diamond_4" in out  # the evaluation table names the custom classes
    with open(os.path.join(workdir, "eval_results.json")) as f:
        logged = json.load(f)["4"]["student"]
    assert sorted(logged["iou"]) == sorted(["background", "disc_1", "square_2", "triangle_3",
                                            "diamond_4"])

    rc, out = run_main("--config", DEMO, "--workdir", workdir, "--mode", "eval",
                       "--checkpoint", "latest", *custom_flags(custom_root))
    assert rc == 0, out[-5000:]
    with open(os.path.join(workdir, "eval_latest.json")) as f:
        evaluated = json.load(f)["results"]["student"]
    assert evaluated["miou"] == pytest.approx(logged["miou"], abs=1e-9)

    one = os.path.join(custom_root, "images", "val", "00000.jpg")
    out_dir = str(tmp_path / "pred")
    rc, out = run_main("--config", DEMO, "--workdir", workdir, "--mode", "predict",
                       "--checkpoint", "latest", "--inputs", one, "--output_dir", out_dir,
                       *custom_flags(custom_root, **{"eval.mode": "original"}))
    assert rc == 0, out[-5000:]
    mask = Image.open(os.path.join(out_dir, "00000.png"))
    assert mask.size == Image.open(one).size and np.asarray(mask).max() < 5
    with open(os.path.join(custom_root, "palette.txt")) as f:
        colours = [int(c) for line in f.read().split("\n")[:5] for c in line.split()]
    assert mask.getpalette()[:15] == colours  # the dataset's palette, not VOC's


def test_huggingface_segformer_eval_and_predict(custom_root, tmp_path):
    """`--checkpoint DIR` of a transformers SegformerForSemanticSegmentation: the model comes from
    its config.json; predictions are that model's argmax."""
    import jax
    from allspark_jax.commands import predict
    from allspark_jax.weights import loader
    workdir = str(tmp_path / "run")
    rc, out = run_main("--config", DEMO, "--workdir", workdir, "--mode", "eval",
                       "--checkpoint", HF_SEGFORMER, *custom_flags(custom_root))
    assert rc == 0, out[-5000:]
    with open(os.path.join(workdir, "eval_hf_segformer_tiny.json")) as f:
        evaluated = json.load(f)
    assert evaluated["step"] is None and evaluated["checkpoint"] == HF_SEGFORMER
    assert evaluated["results"]["student"]["num_images"] == run_config.OVERRIDES[
        "data.synthetic.num_val"]
    assert "diamond_4" in out

    one = os.path.join(custom_root, "images", "val", "00001.jpg")
    out_dir = str(tmp_path / "pred")
    rc, out = run_main("--config", DEMO, "--workdir", workdir, "--mode", "predict",
                       "--checkpoint", os.path.join(HF_SEGFORMER, "model.safetensors"),
                       "--inputs", one, "--output_dir", out_dir,
                       *custom_flags(custom_root, **{"eval.mode": "original"}))
    assert rc == 0, out[-5000:]
    model, variables, _ = loader.load_segformer(HF_SEGFORMER)
    logits = jax.jit(lambda v, x: model.apply(v, x, mode="eval"))(
        variables, predict.load_image(one)[1][None])
    expected = np.asarray(logits[0]).argmax(-1)
    got = np.asarray(Image.open(os.path.join(out_dir, "00001.png")))
    assert got.shape == expected.shape
    assert np.mean(got == expected) > 0.999  # equal up to float32 near-ties


def test_huggingface_class_count_must_match(tmp_path):
    one = str(tmp_path / "one.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(one)
    rc, out = run_main("--config", DEMO, "--workdir", str(tmp_path), "--mode", "predict",
                       "--checkpoint", HF_SEGFORMER, "--inputs", one,
                       "--config.data.num_classes=4", timeout=120)
    assert rc == 2
    assert "the checkpoint predicts 5 classes" in out and "data.num_classes=4" in out, out[-3000:]


@pytest.mark.parametrize("args,message", [
    (["--mode", "serve"], "--mode='serve'"),
    (["--mode", "eval", "--checkpoint", "newest"], "expected a step number, 'latest', 'best'"),
    (["--mode", "eval", "--checkpoint", "/no/such/file.pth"], "no such file"),
    (["--mode", "predict", "--checkpoint", "latest"], "needs --inputs"),
])
def test_bad_flags_give_clear_errors(args, message, tmp_path):
    rc, out = run_main("--config", DEMO, "--workdir", str(tmp_path), *args, timeout=120)
    assert rc != 0
    assert message in out, out[-3000:]


def test_missing_workdir_is_a_clear_error():
    rc, out = run_main("--config", DEMO, timeout=120)
    assert rc != 0 and "--workdir is required" in out, out[-3000:]


def test_a_workdir_that_cannot_be_created_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    for workdir, reason in (("/proc/nope", "No such file or directory"),
                            (str(tmp_path / "file" / "run"), "Not a directory")):
        rc, stdout, stderr = run_main("--config", DEMO, "--workdir", workdir, timeout=120,
                                      split=True)
        assert rc == 2 and stderr.strip() == (
            f"error: --workdir={workdir}: cannot create it ({reason}); expected a folder that "
            "exists or can be created"), stderr[-3000:]
    # `python -m allspark_jax` is the same command, from any folder
    proc = subprocess.run([sys.executable, "-m", "allspark_jax", "--config", "configs/demo.py",
                           "--workdir", "/proc/nope"], capture_output=True, text=True,
                          env=run_config.subprocess_env(), timeout=120, cwd=str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.startswith("error: --workdir=/proc/nope: cannot "
                                                           "create it"), proc.stderr[-3000:]


@pytest.mark.parametrize("args", [
    # the demo's AllSpark keys go back to their defaults; the command line's keys stay
    ["--config.method=supervised"], ["--config.method", "semi", "--config.train.teacher=ema"],
    # a preset in place of the demo's dict of MiT fields
    ["--config.model.backbone=b0"]])
def test_the_method_and_a_backbone_preset_switch_on_the_command_line(args, tmp_path):
    """Validation passes (the run then stops at the missing checkpoint)."""
    rc, out = run_main("--config", DEMO, "--workdir", str(tmp_path), *args, "--mode", "eval",
                       "--checkpoint", "best", timeout=120)
    assert rc == 2 and "no best checkpoint" in out, out[-3000:]


def test_missing_checkpoint_in_workdir_is_a_clear_error(tmp_path):
    rc, out = run_main("--config", DEMO, "--workdir", str(tmp_path), "--mode", "eval",
                       "--checkpoint", "best", *run_config.cli_flags(), timeout=120)
    assert rc == 2 and "no best checkpoint" in out, out[-3000:]


@pytest.mark.parametrize("args,message", [
    (["--config.train.no_such_key=1"], "config.train.no_such_key is not a key; config.train has: "
                                       "conf_thresh, ema_decay, epochs,"),
    (["--config.no_such_key", "1"], "config.no_such_key is not a key; config has: "
                                    "checkpoint_every_steps, compilation_cache, data,"),
    (["--config.optim.lr=fast"], "config.optim.lr='fast': expected a number (now 0.01)"),
    (["--config.train.key_group_size=3"],  # a key whose default is None parses as its type
     "config.train.key_group_size=3: expected None or a divisor of data.batch_size (8)"),
    (["--config.train.key_group_size=all"],
     "config.train.key_group_size='all': expected an integer (now None)"),
    (["--config.data.batch_size=2.5"], "config.data.batch_size='2.5': expected an integer"),
    (["--config.model.remat=maybe"], "config.model.remat='maybe': expected true or false"),
    (["--config.eval.mode=tiled"],
     "config.eval.mode='tiled': expected one of 'original', 'center_crop', 'sliding_window'"),
    (["--config.data.check_files=all"],
     "config.data.check_files='all': expected one of 'none', 'exist', 'decode'"),
    (["--config.keep_checkpoints=0"], "config.keep_checkpoints=0: expected an integer >= 1"),
    (["--config=configs/pascal.py:1_3"], "configs/pascal.py:1_3: unknown split '1_3'; expected one of 92,"),
    (["--config=configs/nope.py"], "configs/nope.py' does not exist"),
    # a key that the method does not read, changed by the config file or the command line
    (["--config.method=semi", "--config.train.warmup_epoch=3"],
     "config.train.warmup_epoch=3: expected 5 (its configs/default.py value) with method 'semi': "
     "only AllSpark reads it"),
    (["--config=configs/demo.py:supervised", "--config.train.teacher=ema"],
     "config.train.teacher='ema': expected 'online' (its configs/default.py value) with method "
     "'supervised': it trains on labeled images only"),
    (["--config=configs/demo.py:unimatch_v2", "--config.train.warmup_epoch=3"],
     "config.train.warmup_epoch=3: expected 5 (its configs/default.py value) with method "
     "'unimatch_v2': only AllSpark reads it"),
    (["--config=configs/demo.py:unimatch_v2", "--config.optim.momentum=0.5"],
     "config.optim.momentum=0.5: expected 0.9 (its configs/default.py value): only optim.name "
     "'sgd' reads it (optim.name='adamw')"),
    # UniMatch V2's recipe switched onto a config of the release's (online teacher, weak view)
    (["--config.method=unimatch_v2"],
     "config.train.teacher='online': method 'unimatch_v2' (UniMatch V2's recipe) trains with its "
     "EMA teacher; expected 'ema' (the dataset configs' 'unimatch_v2' argument sets the recipe, "
     "e.g. configs/pascal.py:1_16,unimatch_v2)"),
    (["--config=configs/pascal.py:1_16,unimatch_v2,dinov2"],
     "configs/pascal.py:1_16,unimatch_v2,dinov2: unknown method or encoder 'dinov2'; expected a "
     "method (allspark, semi, supervised, unimatch_v2, unimatch_v2_allspark) or an encoder (mit, "
     "dinov2_small, dinov2_base, dinov2_large, dinov2_giant)"),
    # a backbone that is no preset, on a config whose backbone is a dict of MiT fields
    (["--config.model.backbone=b9"], "config.model.backbone='b9': unknown MiT variant 'b9'; "
                                     "expected one of ['b0', 'b1', 'b2', 'b3', 'b4', 'b5']"),
    (["--config.model.backbone=(1,2)"], "config.model.backbone='(1,2)': expected a group of keys; "
                                        "set them with --config.model.backbone.KEY=VALUE"),
])
def test_config_errors_are_one_line_with_exit_status_2(args, message, tmp_path):
    """Unknown keys, values of the wrong type, bad enum values, out-of-range values, bad config files
    and arguments: one line naming the key and what is allowed, exit status 2, no traceback."""
    config = [] if args[0].startswith("--config=") else ["--config", DEMO]
    proc = subprocess.run([sys.executable, MAIN, *config, *args, "--workdir", str(tmp_path)],
                          capture_output=True, text=True, env=run_config.subprocess_env(),
                          timeout=120, cwd=run_config.ROOT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [f"error: {proc.stderr.strip()[7:]}"], proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
