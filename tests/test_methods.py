"""config.method 'semi' and 'supervised' (the release's baselines) through the run loop: train,
checkpoint, evaluate and predict with a model that holds no AllSpark; labeled-only epochs."""
import os

import flax
import numpy as np
import pytest

import run_config
from allspark_jax import errors
from allspark_jax import checkpoints, train
from allspark_jax.commands import evaluate, predict
from allspark_jax import config as config_lib
from allspark_jax.data import input_pipeline
from allspark_jax.errors import DataError
from conftest import make_config

# semi with every extension on (EMA teacher, strong student view, threshold, padding, CutMix);
# supervised as the release runs it: 6 labeled // 4 = 1 step per epoch.
RUNS = {
    "semi": dict(method="semi", train__num_train_steps=3, train__teacher="ema",
                 train__ema_decay=0.9, data__student_view="strong", data__cutmix_prob=0.5,
                 train__conf_thresh=0.5, train__loss_u_ignore_padding=True, eval_every_steps=3,
                 checkpoint_every_steps=3),
    "supervised": dict(method="supervised", eval_every_steps=2, checkpoint_every_steps=2),
}


@pytest.fixture(scope="module", params=sorted(RUNS))
def run(request, tmp_path_factory):
    config = run_config.tiny_config(**RUNS[request.param])
    workdir = str(tmp_path_factory.mktemp(request.param))
    return request.param, config, workdir, train.train_and_evaluate(config, workdir)


def test_trains_checkpoints_and_evaluates_without_allspark(run):
    method, config, workdir, out = run
    assert out["step"] == {"semi": 3, "supervised": 2}[method]
    state = out["state"]
    paths = flax.traverse_util.flatten_dict(state.params)
    assert {p[0] for p in paths} == {"backbone", "head"}
    assert not any("allspark" in part for p in paths for part in p)
    assert state.memory is None and "memory" not in state.variables()
    assert (state.ema_params is not None) == (method == "semi")
    last = out["eval"][out["step"]]
    assert set(last) == ({"student", "ema"} if method == "semi" else {"student"})
    assert all(0.0 <= r["miou"] <= 100.0 for r in last.values())
    # the checkpoint restores into this config's template and evaluates
    restored = evaluate.run_evaluation(config, workdir, "latest")
    assert restored["step"] == out["step"]
    np.testing.assert_allclose(restored["results"]["student"]["miou"], last["student"]["miou"],
                               rtol=1e-6)
    # an AllSpark config cannot restore it, and says what to check
    other = run_config.tiny_config(**{**RUNS[method], "method": "allspark"})
    with pytest.raises(errors.CheckpointError,
                       match="method: the checkpoint is plain SegFormer .* this config builds AllSpark"):
        checkpoints.load_inference_variables(other, workdir, "latest")


def test_predicts_from_the_checkpoint(run, tmp_path, monkeypatch):
    _, config, workdir, _ = run
    images = os.path.join(workdir, "synthetic_data", "JPEGImages")
    first = sorted(os.listdir(images))[0]
    caches = []  # predict sets up the run's compilation cache as train and eval do
    monkeypatch.setattr(predict.runtime, "setup_compilation_cache",
                        lambda c, w: caches.append((c.compilation_cache, w)))
    records = predict.run_predict(config, workdir, "latest", [os.path.join(images, first)],
                                  str(tmp_path), quiet=True)
    assert len(records) == 1 and os.path.isfile(records[0]["mask"])
    assert caches == [(config.compilation_cache, workdir)]


def test_supervised_epochs_walk_the_labeled_list():
    """Each epoch: every labeled image once in a fresh order (L // B steps), no unlabeled index."""
    kwargs = dict(seed=3, num_labeled=6, num_unlabeled=16, steps=3, batch=2, local_batch=2,
                  process_index=0, start_epoch=0, start_offset=0, labeled_only=True)
    orders = []
    for epoch in (0, 1):
        out = input_pipeline._epoch_positions(epoch, **kwargs)  # pylint: disable=protected-access
        assert "u" not in out
        orders.append(out["l"].numpy().tolist())
        assert sorted(orders[-1]) == list(range(6))
    assert orders[0] != orders[1]


def test_supervised_pipeline_needs_no_unlabeled_list(data_synthetic_root, tmp_path):
    """A labeled list with no unlabeled list beside it: enough for 'supervised' (labeled batches
    only), a clear error for the methods that read unlabeled images."""
    labeled = tmp_path / "labeled.txt"
    labeled.write_text(open(os.path.join(data_synthetic_root, "splits", "default",
                                         "labeled.txt")).read())
    config = make_config(name="synthetic", root=data_synthetic_root, split=str(labeled),
                         num_classes=5, crop_size=24, batch_size=2, check_files="decode")
    with pytest.raises(DataError, match=r"no unlabeled list for data.split="):
        input_pipeline.train_plan(config_lib.data_options(config))
    config.method = "supervised"
    opts = config_lib.data_options(config)
    plan = input_pipeline.train_plan(opts)
    assert plan.split.unlabeled == [] and plan.unlabeled_reader is None
    assert plan.steps_per_epoch == 1  # 3 labeled // 2
    batch = next(input_pipeline.create_train_iterator(opts, process_index=0, process_count=1))
    assert set(batch) == {"image_l", "mask_l"} and batch["image_l"].shape == (2, 24, 24, 3)


def test_allspark_internals_need_allspark():
    from allspark_jax import inspection
    x = np.zeros((1, 8, 8, 3), np.float32)
    with pytest.raises(ValueError, match=r"no Semantic Memory.*config.method 'allspark'"):
        inspection.allspark_internals(None, {"params": {}, "batch_stats": {}}, x, x)
