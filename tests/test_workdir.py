"""Workdir I/O through etils.epath: a local workdir and a fake remote (`gs://`) one.

The fake remote filesystem maps `gs://bucket/...` onto a temporary folder through
`etils.epath.testing.mock_epath`, so every file the project itself writes or reads in a workdir (the
JSON results, the synthetic dataset, its lists and class names, the listed-file checks) goes
through the remote code path. Orbax and tf.summary open remote paths with their own filesystems.
"""
import os

import pytest
from etils.epath import gpath
from etils.epath import testing as epath_testing

from allspark_jax import config as config_lib
from allspark_jax import workdir
from allspark_jax.data import input_pipeline
from conftest import make_config

BUCKET = "gs://bucket"


@pytest.fixture()
def fake_gcs(tmp_path, monkeypatch):
    """gs://bucket/<p> -> tmp_path/bucket/<p> for every epath operation."""
    # With TensorFlow installed epath sends gs:// to tf.io.gfile, around the mockable backends.
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    def local(path):
        text = os.fspath(path)
        return str(tmp_path / "bucket" / text[len(BUCKET) + 1:]) if text.startswith(BUCKET) else text

    def one(fn_name):
        return lambda orig, path, *a, **k: orig(local(path), *a, **k)

    def two(orig, path, dst, *a, **k):
        return orig(local(path), local(dst), *a, **k)

    def walk(orig, top, **k):
        yield from orig(local(top), **k)

    def glob(orig, pattern):
        return [BUCKET + "/" + os.path.relpath(p, tmp_path / "bucket")
                for p in orig(local(pattern))]

    names = ("open", "exists", "isdir", "listdir", "makedirs", "mkdir", "remove", "rmtree", "stat")
    with epath_testing.mock_epath(**{n: one(n) for n in names}, rename=two, replace=two, copy=two,
                                  walk=walk, glob=glob):
        yield tmp_path / "bucket"


def test_json_is_written_atomically_and_read_back(tmp_path):
    path = workdir.resolve(tmp_path / "run") / workdir.EVAL_HISTORY_JSON
    assert workdir.read_json(path, {}) == {}
    workdir.write_json(path, {"8": {"miou": 1.5}})
    assert workdir.read_json(path) == {"8": {"miou": 1.5}}
    assert sorted(os.listdir(tmp_path / "run")) == [workdir.EVAL_HISTORY_JSON]  # no temporary left


def test_relative_workdirs_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert os.fspath(workdir.resolve("run")) == str(tmp_path / "run")
    assert os.fspath(workdir.resolve(f"{BUCKET}/run")) == f"{BUCKET}/run"


def test_remote_workdir_holds_results_and_the_synthetic_dataset(fake_gcs):
    remote = f"{BUCKET}/run"
    workdir.write_json(workdir.resolve(remote) / "eval_latest.json", {"step": 8})
    assert workdir.read_json(workdir.resolve(remote) / "eval_latest.json") == {"step": 8}
    assert (fake_gcs / "run" / "eval_latest.json").is_file()

    config = make_config(name="synthetic", root=None, split="default", num_classes=5,
                         crop_size=32, batch_size=2)
    config.data.synthetic.update(num_train=6, num_labeled=2, num_val=2, size=40)
    opts = config_lib.data_options(config, remote)
    assert opts.root == f"{remote}/{workdir.SYNTHETIC_DIR}"
    assert opts.class_names[0] == "background" and len(opts.class_names) == 5
    assert (fake_gcs / "run" / workdir.SYNTHETIC_DIR / "class_names.txt").is_file()
    plan = input_pipeline.train_plan(opts)  # lists read and every listed file checked remotely
    assert (len(plan.split.labeled), len(plan.split.unlabeled), plan.steps_per_epoch) == (2, 4, 2)
    os.remove(fake_gcs / "run" / workdir.SYNTHETIC_DIR / "JPEGImages" / "train_00003.jpg")
    with pytest.raises(Exception, match="train_00003.jpg"):
        input_pipeline.train_plan(opts)
