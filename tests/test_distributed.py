"""Data parallelism: 1 device, 8 simulated devices (replicated or sharded parameters) and two
processes on 127.0.0.1 (4 devices each, gloo collectives) end three train steps (CutMix partners
across devices included) in the same state; UniMatch V2's iteration with AllSpark on 1 and 8
devices too."""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5


def run_worker(out, *flags, background=False):
    path = [ROOT, os.path.dirname(WORKER), os.environ.get("PYTHONPATH")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}
    cmd = [sys.executable, WORKER, str(out), *map(str, flags)]
    if background:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return np.load(out)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single_device(tmp_path_factory):
    return run_worker(tmp_path_factory.mktemp("d1") / "state.npz", "--devices", 1)


def assert_same_state(a, b):
    assert set(a.files) == set(b.files)
    for k in a.files:
        x, y = a[k].astype(np.float64), b[k].astype(np.float64)
        if a[k].dtype.kind in "iu":
            np.testing.assert_array_equal(x, y, err_msg=k)
        else:
            assert np.linalg.norm(x - y) <= TOL * max(np.linalg.norm(x), 1e-30), k


@pytest.mark.parametrize("flags", [("--devices", 8), ("--devices", 8, "--shard_params")],
                         ids=["8dev-replicated", "8dev-sharded-params"])
def test_eight_devices_match_one(single_device, tmp_path, flags):
    assert_same_state(single_device, run_worker(tmp_path / "state.npz", *flags))


def test_two_processes_match_one(single_device, tmp_path):
    port = free_port()
    out = tmp_path / "state.npz"
    common = ("--devices", 4, "--processes", 2, "--port", port)
    other = run_worker(out, *common, "--process_id", 1, background=True)
    try:
        state = run_worker(out, *common, "--process_id", 0)
    finally:
        log, _ = other.communicate(timeout=600)
    assert other.returncode == 0, log[-3000:]
    assert_same_state(single_device, state)


def test_unimatch_v2_allspark_on_eight_devices_matches_one(tmp_path):
    method = ("--method", "unimatch_v2_allspark")
    one = run_worker(tmp_path / "one.npz", "--devices", 1, *method)
    assert_same_state(one, run_worker(tmp_path / "eight.npz", "--devices", 8, *method))
