"""Parity with UniMatch V2's own trainer: the verifier on unimatch_v2_tiny.npz (three steps of
unimatch_v2.py's main() on a tiny DINOv2 + DPT), and the verifier failing on perturbed steps."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from allspark_jax import optimizer, train_step
from allspark_jax.tools import verify_reference, verify_unimatch_v2
from allspark_jax.tools.comparison import FORWARD_RTOL, TRAINED_RTOL
from reference_model import DATA

UNIMATCH_V2_NPZ = os.path.join(DATA, "unimatch_v2_tiny.npz")


@pytest.fixture(scope="module")
def recording():
    with np.load(UNIMATCH_V2_NPZ) as f:
        data = {k: f[k] for k in f.files}
    return data, json.loads(str(data["meta_json"]))


def run_steps(recording, steps=1) -> dict:
    """The verifier's results on the first `steps` recorded steps, by case name."""
    data, meta = recording
    results = verify_unimatch_v2.verify(UNIMATCH_V2_NPZ, data, meta, print_fn=lambda _: None,
                                        steps=steps)
    return {r.name: r for r in results}


def test_every_case_within_its_tolerance(capsys):
    """Through the command line's entry: every case of the three steps passes as a plain `ok`."""
    assert verify_reference.main([UNIMATCH_V2_NPZ]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "unimatch_v2_tiny.npz: 13 cases ok, 0 failed" in out
    lines = [line for line in out.splitlines() if line.startswith(("ok", "FAIL"))]
    names = [f"step{t} {case}" for t in range(3)
             for case in ("schedule", "losses") + (("grads",) if t == 0 else ()) + ("update",
                                                                                    "state")]
    assert [line[5:].split("  ")[0].strip() for line in lines] == names
    assert all(line.startswith("ok   ") for line in lines), lines
    for line in lines:
        forward = " schedule " in line or line.startswith("ok   step0 losses ")
        assert f"tol {FORWARD_RTOL if forward else TRAINED_RTOL:.0e}" in line, line
    for t in range(3):
        losses = next(line for line in lines if f"step{t} losses " in line)
        assert "agree on 100.0000% (weak view), targets on 100.0000%" in losses
        update = next(line for line in lines if f"step{t} update " in line)
        # The 32 attention key biases (8 per block, 4 blocks): the only round-off entries left out.
        assert "32 round-off gradient entries left out" in update, update
        state = next(line for line in lines if f"step{t} state " in line)
        assert "5 parameters without a gradient unchanged, without moments" in state, state
        assert "NEVER_APPLIED" not in state, state


def test_wrong_cutmix_partner_fails(recording, monkeypatch):
    """Image i's CutMix partner rolled (i - 1) instead of flipped (B - 1 - i): the targets, losses
    and everything after them fail at step 0."""
    monkeypatch.setattr(train_step, "flip_in_groups", lambda a, groups: jnp.roll(a, 1, axis=0))
    results = run_steps(recording)
    assert results["step0 schedule"].ok
    for case in ("losses", "grads", "update", "state"):
        assert not results[f"step0 {case}"].ok, case
    assert "targets on 100.0000%" not in results["step0 losses"].note


def test_wrong_ema_schedule_fails(recording, monkeypatch):
    """The EMA decay one step late (min(1 - 1/(t + 2), cap): 0.5 after step 0 instead of 0): the
    schedule and the EMA teacher's change over the step fail."""
    monkeypatch.setattr(train_step, "ema_decay", lambda step, method, cfg: jnp.minimum(
        1.0 - 1.0 / (step.astype(jnp.float32) + 2.0), cfg.ema_decay))
    results = run_steps(recording)
    assert not results["step0 schedule"].ok and not results["step0 update"].ok
    assert results["step0 losses"].ok and results["step0 grads"].ok


def test_learning_rate_error_fails_the_update_not_the_state(recording, monkeypatch):
    """An optimizer applying 1.001 x the learning rate (its reported schedules right): only the
    parameters' change over the step sees it; the state after it is within its tolerance."""
    create = optimizer.create_optimizer

    def off(optim_config, total_steps):
        bad = optim_config.copy_and_resolve_references()
        bad.lr = optim_config.lr * 1.001
        return create(bad, total_steps)[0], create(optim_config, total_steps)[1]

    monkeypatch.setattr(optimizer, "create_optimizer", off)
    results = run_steps(recording)
    assert results["step0 schedule"].ok and results["step0 state"].ok
    update = results["step0 update"]
    assert not update.ok and 5e-4 < update.max_rel < 2e-3, update.line()


def test_incomplete_recording_cannot_be_verified(tmp_path, recording, capsys):
    data, _ = recording
    path = tmp_path / "unimatch_v2_tiny.npz"
    np.savez(path, **{k: v for k, v in data.items() if k != "step1/teacher_logits"})
    assert verify_reference.main([str(path)]) == 1
    out = capsys.readouterr().out
    assert "cannot verify: " in out and "not a UniMatch V2 recording: it lacks " \
        "step1/teacher_logits" in out, out
