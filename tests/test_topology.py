"""Checkpoints move between topologies.

A run trained by 2 processes x 2 devices (main.py on 127.0.0.1) is evaluated by this process (one
device) and resumed from its step-3 checkpoint on 1 process x 1 device (here) and on 1 process x 8
devices with `shard_params` (tests/topology_worker.py); each resumed run ends where the 2-process
run ended. Checkpoints that do not fit the config name what differs; a failure of orbax itself is
reported as one.
"""
import glob
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import run_config
from allspark_jax import errors
from allspark_jax import checkpoints
from allspark_jax import train
from allspark_jax.commands import evaluate

MAIN = os.path.join(run_config.ROOT, "main.py")
DEMO = "configs/demo.py"
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "topology_worker.py")
STEPS, RESUME = run_config.TOPOLOGY_STEPS, run_config.TOPOLOGY_RESUME_STEP
TIMEOUT_S = 600
# |resumed - uninterrupted| <= ATOL + RTOL * |uninterrupted|, element by element. Other device
# counts sum the batch's losses and statistics in another order, so floats agree to float32
# rounding (measured: at most 1.9e-6, a Semantic Memory feature of magnitude ~3, i.e. 16 ulp; the
# pre-BatchNorm biases and their momenta have no gradient and hold rounding noise of ~1e-8); integer
# arrays (memory pointers, step, PRNG key) agree exactly.
RTOL, ATOL = 1e-5, 4e-6


def topology_config(**extra):
    return run_config.tiny_config(**run_config.TOPOLOGY, **extra)


def flat(state) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_leaves_with_path(state)}


def assert_close(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for k, y in want.items():
        x = got[k]
        assert x.shape == y.shape and x.dtype == y.dtype, k
        if y.dtype.kind in "iu":
            np.testing.assert_array_equal(x, y, err_msg=k)
        else:
            np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL, err_msg=k)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_run(workdir: str, step: int, dest) -> str:
    """A fresh workdir holding only `workdir`'s checkpoint `step` (and its synthetic data)."""
    for name in (os.path.join(checkpoints.LATEST_DIR, str(step)), "synthetic_data"):
        shutil.copytree(os.path.join(workdir, name), os.path.join(dest, name))
    return str(dest)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """main.py trained by two processes (2 simulated devices each, gloo on 127.0.0.1)."""
    workdir = str(tmp_path_factory.mktemp("two_processes"))
    env = {**run_config.subprocess_env(),
           "XLA_FLAGS": run_config.xla_flags("--xla_force_host_platform_device_count=2"),
           "ALLSPARK_COORDINATOR": f"127.0.0.1:{free_port()}", "ALLSPARK_NUM_PROCESSES": "2"}
    cmd = [sys.executable, MAIN, "--config", DEMO, "--workdir", workdir,
           *run_config.cli_flags(**run_config.TOPOLOGY)]
    procs = [subprocess.Popen(cmd, env={**env, "ALLSPARK_PROCESS_ID": str(i)}, cwd=run_config.ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in (1, 0)]
    try:
        logs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-5000:]
    # Each process wrote its own part of every checkpoint.
    state_dir = os.path.join(workdir, checkpoints.LATEST_DIR, str(STEPS), "state")
    parts = glob.glob(os.path.join(state_dir, "ocdbt.process_*"))
    assert sorted(map(os.path.basename, parts)) == ["ocdbt.process_0", "ocdbt.process_1"]
    return workdir


@pytest.fixture(scope="module")
def two_process_final(two_process_run):
    """The 2-process run's final state, restored on this process."""
    return restore_final(two_process_run)


def restore_final(workdir: str) -> dict:
    """The last checkpoint of `workdir`, restored replicated on this process's device."""
    ck = checkpoints.Checkpointer(workdir, read_only=True)
    try:
        state, meta, step = ck.restore(STEPS, checkpoints.restore_template(topology_config()))
    finally:
        ck.close()
    assert step == STEPS == meta["step"]
    return flat(state)


def logged_student(workdir: str) -> dict:
    with open(os.path.join(workdir, "eval_results.json")) as f:
        return json.load(f)[str(STEPS)]["student"]


def test_one_process_evaluates_the_two_process_checkpoint(two_process_run, two_process_final):
    out = evaluate.run_evaluation(topology_config(), two_process_run, "latest")
    assert out["step"] == STEPS
    logged = logged_student(two_process_run)
    # Each image is predicted on its own, so the device count does not change the arithmetic.
    assert out["results"]["student"]["miou"] == pytest.approx(logged["miou"], abs=1e-9)
    assert out["results"]["student"]["iou"] == pytest.approx(logged["iou"], abs=1e-9)
    variables, _ = checkpoints.load_inference_variables(topology_config(), two_process_run, STEPS)
    kernel = variables["student"]["params"]["head"]["linear_pred"]["kernel"]
    assert kernel.sharding.is_fully_replicated and len(kernel.sharding.device_set) == 1
    np.testing.assert_array_equal(
        kernel, two_process_final[".params['head']['linear_pred']['kernel']"])


def test_resume_on_one_device(two_process_run, two_process_final, tmp_path):
    workdir = copy_run(two_process_run, RESUME, tmp_path / "run")
    # Only the steps after the checkpoint may run: ending at the last step proves the resume.
    out = train.train_and_evaluate(topology_config(), workdir, stop_after=STEPS - RESUME)
    assert out["step"] == STEPS
    assert_close(flat(out["state"]), two_process_final)


def test_resume_on_eight_devices_with_sharded_params(two_process_run, two_process_final, tmp_path):
    workdir = copy_run(two_process_run, RESUME, tmp_path / "run")
    out = tmp_path / "final.npz"
    proc = subprocess.run(
        [sys.executable, WORKER, workdir, str(out), "--devices", "8", "--shard_params"],
        env=run_config.subprocess_env(), cwd=run_config.ROOT, capture_output=True, text=True,
        timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    final = dict(np.load(out))
    assert_close(final, two_process_final)
    # Its last checkpoint, split over 8 devices, restores replicated on this one device.
    for k, x in restore_final(workdir).items():
        np.testing.assert_array_equal(x, final[k], err_msg=k)


@pytest.mark.parametrize("overrides,expected", [
    ({"train.teacher": "ema"},
     ["teacher: the checkpoint was written with train.teacher='online' (no EMA arrays), this "
      "config has train.teacher='ema'"]),
    ({"model.decoder_dim": 8},
     ["params/head/linear_pred/kernel: float32[1, 1, 16, 5] in the checkpoint, float32[1, 1, 8, 5] "
      "in this config", "... and 2 more differences"]),
    ({"data.crop_size": 64},
     ["memory/allspark/attn/kv_queue: float32[5, 32, 1] in the checkpoint, float32[5, 32, 4] in "
      "this config"]),
    ({"optim.name": "adamw"},
     ["optimizer: the checkpoint was written with optim.name='sgd', this config has "
      "optim.name='adamw'"]),
], ids=["teacher", "decoder_dim", "crop_size", "optimizer"])
def test_a_checkpoint_of_another_state_names_what_differs(two_process_run, overrides, expected):
    with pytest.raises(errors.CheckpointMismatchError) as info:
        checkpoints.load_inference_variables(topology_config(**overrides), two_process_run,
                                             "latest")
    message = str(info.value)
    assert f"checkpoint step {STEPS} in {two_process_run}" in message
    assert "Topology" not in message
    for line in expected:
        assert f"\n  {line}" in message
    if "optim.name" in overrides:  # the optimiser's arrays are not listed one by one
        assert "opt_state/" not in message


def test_state_differences_names_the_method_and_leaves_out_mirrors():
    f32 = np.dtype("float32")
    segformer = {"params/head/linear_pred/kernel": ((1, 1, 8, 5), f32),
                 "opt_state/1/trace/head/linear_pred/kernel": ((1, 1, 8, 5), f32)}
    allspark = {**segformer, "params/allspark/map_in/kernel": ((8, 8), f32),
                "opt_state/1/trace/allspark/map_in/kernel": ((8, 8), f32),
                "memory/allspark/attn/kv_queue": ((5, 8, 1), f32)}
    assert checkpoints.state_differences(allspark, segformer) == [
        "method: the checkpoint is AllSpark (params/allspark, the Semantic Memory), this config "
        "builds plain SegFormer (no AllSpark module, no Semantic Memory)"]
    wider = {k: ((1, 1, 8, 6), f32) for k in segformer}
    assert checkpoints.state_differences(segformer, wider) == [
        "params/head/linear_pred/kernel: float32[1, 1, 8, 5] in the checkpoint, "
        "float32[1, 1, 8, 6] in this config"]
    assert checkpoints.state_differences(segformer, {}) == [
        "params/head/linear_pred/kernel: float32[1, 1, 8, 5] only in the checkpoint"]


def test_an_orbax_failure_is_not_reported_as_a_config_mistake(two_process_run, tmp_path):
    workdir = copy_run(two_process_run, RESUME, tmp_path / "run")
    state_dir = os.path.join(workdir, checkpoints.LATEST_DIR, str(RESUME), "state")
    data = glob.glob(os.path.join(state_dir, "**", "d"), recursive=True)
    assert data
    for d in data:  # the array data goes; the metadata (paths, shapes) stays
        shutil.rmtree(d)
    with pytest.raises(errors.CheckpointReadError) as info:
        checkpoints.load_inference_variables(topology_config(), workdir, RESUME)
    message = str(info.value)
    assert message.startswith(f"orbax could not read checkpoint step {RESUME} in ")
    assert "the config is not the cause" in message and "NOT_FOUND" in message


def test_library_and_notebooks_read_checkpoints_through_checkpoints_py():
    """One restore path: only checkpoints.py imports orbax; notebooks load with it."""
    package = os.path.join(run_config.ROOT, "allspark_jax")
    importers = []
    for path in glob.glob(os.path.join(package, "**", "*.py"), recursive=True):
        with open(path) as f:
            if any(line.lstrip().startswith(("import orbax", "from orbax")) for line in f):
                importers.append(os.path.relpath(path, package))
    assert importers == ["checkpoints.py"]
    loaders = 0
    for path in glob.glob(os.path.join(run_config.ROOT, "colabs", "*.ipynb")):
        with open(path) as f:
            code = "".join("".join(c["source"]) for c in json.load(f)["cells"]
                           if c["cell_type"] == "code")
        assert "import orbax" not in code and "ocp." not in code, path
        loaders += "checkpoints.load_inference_variables(" in code
    assert loaders == 2  # predictions.ipynb and allspark_internals.ipynb
