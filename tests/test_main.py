"""main.py end to end on the (shortened) demo config: train, eval, predict, and clear flag errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import run_config

MAIN = os.path.join(run_config.ROOT, "main.py")
DEMO = os.path.join(run_config.ROOT, "configs", "demo.py")


def run_main(*args, timeout=300):
    proc = subprocess.run([sys.executable, MAIN, *args], capture_output=True, text=True,
                          env=run_config.subprocess_env(), timeout=timeout, cwd=run_config.ROOT)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("main_train"))
    rc, out = run_main("--config", DEMO, "--workdir", workdir, *run_config.cli_flags())
    assert rc == 0, out[-5000:]
    return workdir, out


def test_train_writes_checkpoints_logs_and_results(trained):
    workdir, out = trained
    names = set(os.listdir(workdir))
    assert {"checkpoints", "checkpoints_best", "eval_results.json", "config.json",
            "synthetic_data"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["6", "8"]
    for key in ("train/loss=", "train/lr_encoder=", "train/lr_rest=", "train/images_per_second=",
                "eval/miou="):
        assert key in out, key
    assert "mIoU" in out  # the per-class table


def test_eval_reproduces_the_logged_miou(trained):
    workdir, _ = trained
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
    workdir, _ = trained
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
    (["--config=configs/pascal.py:1_3"], "configs/pascal.py:1_3: unknown split; expected one of 92,"),
    (["--config=configs/nope.py"], "configs/nope.py' does not exist"),
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
