"""Orbax checkpoints: an interrupted run resumes exactly; latest / best / step specs; clear errors."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

import run_config
from allspark_jax import errors
from allspark_jax import checkpoints
from allspark_jax import train


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    out = train.train_and_evaluate(run_config.tiny_config(), workdir)
    return workdir, out


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """Killed after step 5 (checkpoints at 3, best at 4), then started again to the end."""
    workdir = str(tmp_path_factory.mktemp("resumed"))
    first = train.train_and_evaluate(run_config.tiny_config(), workdir, stop_after=5)
    assert first["step"] == 5
    second = train.train_and_evaluate(run_config.tiny_config(), workdir)
    return workdir, first, second


def _leaves(state):
    return jax.tree_util.tree_leaves_with_path(jax.tree.map(np.asarray, state))


def test_uninterrupted_run_trains_evaluates_and_checkpoints(uninterrupted):
    workdir, out = uninterrupted
    assert out["step"] == run_config.STEPS
    assert sorted(out["eval"]) == [4, 8]
    ck = checkpoints.Checkpointer(workdir, read_only=True)
    assert ck.latest.all_steps() == [6, 8]  # keep_checkpoints = 2 of 3, 6, 8
    assert len(ck.best.all_steps()) == 1
    with open(os.path.join(workdir, "eval_results.json")) as f:
        logged = json.load(f)
    assert sorted(logged) == ["4", "8"]
    assert 0.0 <= logged["8"]["student"]["miou"] <= 100.0
    assert set(logged["8"]["student"]["iou"]) == {"background", "disc_1", "square_2", "triangle_3",
                                                  "diamond_4"}


def test_resumed_run_ends_with_the_same_state(uninterrupted, resumed):
    _, out = uninterrupted
    _, _, second = resumed
    assert second["step"] == run_config.STEPS
    a, b = _leaves(out["state"]), _leaves(second["state"])
    assert [p for p, _ in a] == [p for p, _ in b]
    for (path, x), (_, y) in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    assert out["eval"][8]["student"]["miou"] == pytest.approx(second["eval"][8]["student"]["miou"],
                                                              abs=1e-6)


def test_unimatch_v2_allspark_resumes_exactly(tmp_path):
    """UniMatch V2's iteration with AllSpark: the EMA teacher on its schedule, AdamW's moments,
    the Semantic Memory and both strong views' positions all resume where the run stopped."""
    config = lambda: run_config.tiny_config(method="unimatch_v2_allspark")  # noqa: E731
    whole = train.train_and_evaluate(config(), str(tmp_path / "whole"))
    assert whole["step"] == run_config.STEPS and set(whole["eval"][8]) == {"student", "ema"}
    first = train.train_and_evaluate(config(), str(tmp_path / "resumed"), stop_after=5)
    assert first["step"] == 5
    second = train.train_and_evaluate(config(), str(tmp_path / "resumed"))
    a, b = _leaves(whole["state"]), _leaves(second["state"])
    assert [p for p, _ in a] == [p for p, _ in b]
    assert any("mu" in jax.tree_util.keystr(p) for p, _ in a)  # AdamW's moments are there
    for (path, x), (_, y) in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_restore_specs_and_state_contents(uninterrupted):
    workdir, out = uninterrupted
    ck = checkpoints.Checkpointer(workdir, read_only=True)
    template = jax.eval_shape(lambda: out["state"])
    state, meta, step = ck.restore("latest", template)
    assert step == 8 and meta["step"] == 8 and int(state.step) == 8
    for (_, x), (_, y) in zip(_leaves(out["state"]), _leaves(state)):
        np.testing.assert_array_equal(x, y)
    _, _, step6 = ck.restore(6, template)
    assert step6 == 6
    _, best_meta, best_step = ck.restore("best", template)
    assert best_step in (4, 8) and best_meta["eval"]["student"]["miou"] == max(
        r["student"]["miou"] for r in out["eval"].values())
    # The Semantic Memory and its pointers are part of the state.
    assert state.memory["allspark"]["attn"]["queue_ptr"].shape == (5,)


@pytest.mark.parametrize("spec,message", [
    ("7", "no such step"), ("bestest", "expected a step number"), ("/nonexistent/w.pth", "no such file")])
def test_bad_specs(uninterrupted, spec, message):
    workdir, _ = uninterrupted
    with pytest.raises(errors.CheckpointError, match=message):
        checkpoints.Checkpointer(workdir, read_only=True).resolve(spec)


def test_best_in_an_empty_workdir_is_a_clear_error(tmp_path):
    with pytest.raises(errors.CheckpointError, match="no best checkpoint"):
        checkpoints.Checkpointer(str(tmp_path), read_only=True).resolve("best")


def test_load_inference_variables_from_a_checkpoint_and_an_official_file(uninterrupted, tmp_path):
    from allspark_jax.weights import release_files
    workdir, out = uninterrupted
    config = run_config.tiny_config()
    variables, info = checkpoints.load_inference_variables(config, workdir, "latest")
    assert info["step"] == 8 and "ema" not in variables
    np.testing.assert_array_equal(
        np.asarray(variables["student"]["params"]["head"]["linear_pred"]["kernel"]),
        np.asarray(out["state"].params["head"]["linear_pred"]["kernel"]))
    path = str(tmp_path / "official.pth")
    release_files.save_official_checkpoint(jax.tree.map(np.asarray, out["state"].variables()), path)
    imported, info = checkpoints.load_inference_variables(config, None, path)
    np.testing.assert_array_equal(
        np.asarray(imported["student"]["params"]["head"]["linear_pred"]["kernel"]),
        np.asarray(out["state"].params["head"]["linear_pred"]["kernel"]))


def _damage_all(workdir):
    """Deletes the largest (array data) file of every checkpoint's state: none can be restored."""
    ck = checkpoints.Checkpointer(workdir, read_only=True)
    paths = [os.path.join(workdir, folder, str(step))
             for folder, manager in ((checkpoints.LATEST_DIR, ck.latest),
                                     (checkpoints.BEST_DIR, ck.best))
             for step in manager.all_steps()]
    for path in paths:
        files = [os.path.join(d, n) for d, _, names in os.walk(os.path.join(path, "state"))
                 for n in names]
        os.remove(max(files, key=os.path.getsize))
    return paths


def test_when_no_checkpoint_restores_none_is_set_aside(uninterrupted, tmp_path):
    """A rerun must fail the same way, not find an empty workdir and start again from step 0."""
    workdir = str(tmp_path / "damaged")
    shutil.copytree(uninterrupted[0], workdir)
    paths = _damage_all(workdir)
    template = jax.eval_shape(lambda: uninterrupted[1]["state"])
    for _ in range(2):
        with pytest.raises(errors.CheckpointError, match="can be restored"):
            checkpoints.Checkpointer(workdir).restore_newest_readable(template, set_aside=True)
        assert all(os.path.isdir(p) and not os.path.exists(p + ".unreadable") for p in paths)


def test_best_meta_unreadable_comes_from_the_eval_history(uninterrupted, tmp_path):
    workdir = str(tmp_path / "meta")
    shutil.copytree(uninterrupted[0], workdir)
    ck = checkpoints.Checkpointer(workdir)
    step = max(ck.best.all_steps())
    assert ck.best_meta()["eval"] == uninterrupted[1]["eval"][step]
    shutil.rmtree(os.path.join(workdir, checkpoints.BEST_DIR, str(step), "meta"))
    ck = checkpoints.Checkpointer(workdir)
    assert ck.best_meta() is None  # nothing on record: best-tracking starts anew
    history = {s: r for s, r in uninterrupted[1]["eval"].items()}
    assert ck.best_meta(history) == {"step": step, "eval": history[step]}
