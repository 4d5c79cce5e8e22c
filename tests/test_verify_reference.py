"""Parity with the official release: the reference verifier on the recorded file."""
import os
import shutil

import numpy as np
import pytest

from allspark_jax.tools import verify_reference
from reference_model import REFERENCE_NPZ


@pytest.fixture(scope="module")
def results():
    lines = []
    return verify_reference.verify(REFERENCE_NPZ, print_fn=lines.append), lines


def test_every_case_within_tolerance(results):
    results, lines = results
    print("\n".join(lines))
    names = {r.name for r in results}
    for case in ("encoder_eval", "encoder_eval_u", "eval_single", "train_forward_nomem",
                 "train_forward_mem", "loss (ce, ohem)", "miou counting", "train_step lrs",
                 "train_step grads0", "train_step state1", "train_step state2", "train_step state3"):
        assert case in names, case
    bad = [r.line() for r in results if not r.ok]
    assert not bad, bad
    assert max(r.max_rel for r in results) <= verify_reference.RTOL


def test_forward_parity_is_float32_exact(results):
    results, _ = results
    forward = [r for r in results if not r.name.startswith("train_step")]
    assert max(r.max_rel for r in forward) < 2e-6


def test_perturbed_reference_fails(tmp_path):
    """The verifier must notice a wrong output and exit non-zero."""
    with np.load(REFERENCE_NPZ) as f:
        data = {k: f[k] for k in f.files}
    keep = {k: v for k, v in data.items()
            if k == "meta_json" or k.startswith(("state0/", "inputs/", "eval_single/", "miou/"))}
    keep["eval_single/logits"] = keep["eval_single/logits"] * (1 + 1e-3)
    keep["miou/union"] = keep["miou/union"] + 1
    path = tmp_path / "perturbed.npz"
    np.savez(path, **keep)
    lines = []
    results = verify_reference.verify(str(path), print_fn=lines.append)
    assert {r.name: r.ok for r in results} == {"eval_single": False, "miou counting": False}
    assert verify_reference.main([str(path)]) == 1
