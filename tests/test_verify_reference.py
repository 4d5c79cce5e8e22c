"""Parity with the official release: the reference verifier on the recorded file."""
import jax
import numpy as np
import pytest

from allspark_jax import state as state_lib
from allspark_jax.weights import release
from allspark_jax.tools import verify_reference
from allspark_jax.tools.verify_reference import FORWARD_RTOL, MAX_KINK_FLIPS, TRAINED_RTOL
from reference_model import BASELINES_NPZ, REFERENCE_NPZ, reference

FORWARD_CASES = ("encoder_eval", "encoder_eval_u", "eval_single", "eval_single_bucketed",
                 "train_forward_nomem",
                 "train_forward_mem", "loss (ce, ohem)", "miou counting", "train_step lrs",
                 "train_step 0 losses")
TRAINED_CASES = ("train_step grads0", "train_step state1", "train_step 1 losses",
                 "train_step state2", "train_step 2 losses", "train_step state3")


@pytest.fixture(scope="module")
def results():
    lines = []
    return verify_reference.verify(REFERENCE_NPZ, print_fn=lines.append), lines


@pytest.fixture(scope="module")
def recorded():
    with np.load(REFERENCE_NPZ) as f:
        return {k: f[k] for k in f.files}


def subset(recorded, *prefixes):
    """The model description plus the cases under `prefixes`."""
    return {k: v for k, v in recorded.items()
            if k == "meta_json" or k.startswith(("state0/", "inputs/") + prefixes)}


def run_main(tmp_path, data, capsys):
    path = tmp_path / "reference.npz"
    np.savez(path, **data)
    status = verify_reference.main([str(path)])
    return status, capsys.readouterr().out


def test_every_case_within_its_tolerance(results):
    results, lines = results
    print("\n".join(lines))
    assert [r.name for r in results] == [
        "encoder_eval", "encoder_eval_u", "eval_single", "eval_single_bucketed",
        "train_forward_nomem", "train_forward_mem", "loss (ce, ohem)", "miou counting", "train_step lrs",
        "train_step 0 losses", "train_step grads0", "train_step state1", "train_step 1 losses",
        "train_step state2", "train_step 2 losses", "train_step state3"]
    bad = [r.line() for r in results if not r.ok]
    assert not bad, bad
    assert all(r.status == "ok" for r in results)  # no case needs the ReLU-kink fallback
    for r in results:
        assert r.rtol == (FORWARD_RTOL if r.name in FORWARD_CASES else TRAINED_RTOL), r.name
        assert r.max_rel <= r.rtol, r.line()


@pytest.fixture(scope="module")
def baseline_results():
    return verify_reference.verify(BASELINES_NPZ, print_fn=lambda _: None)


def test_baselines_every_case_within_its_tolerance(baseline_results):
    """The release's semi and supervised trainers (model without AllSpark), step for step."""
    names = []
    for prefix in ("semi_step", "sup_step"):
        names += [f"{prefix} lrs", f"{prefix} 0 losses", f"{prefix} grads0", f"{prefix} state1",
                  f"{prefix} 1 losses", f"{prefix} state2", f"{prefix} 2 losses", f"{prefix} state3"]
    inference = [r.name for r in baseline_results if r.name.startswith("eval_single")]
    assert inference[0] == "eval_single"  # (and every other inference case of eval_single/)
    assert [r.name for r in baseline_results] == inference + names
    bad = [r.line() for r in baseline_results if not r.ok]
    assert not bad, bad
    assert all(r.status == "ok" for r in baseline_results)
    forward = {"semi_step lrs", "semi_step 0 losses", "sup_step lrs", "sup_step 0 losses"}
    for r in baseline_results:
        want = FORWARD_RTOL if r.name in forward or r.name in inference else TRAINED_RTOL
        assert r.rtol == want, r.name
        assert r.max_rel <= r.rtol, r.line()
    semi = [r for r in baseline_results if r.name.startswith("semi_step") and "losses" in r.name]
    assert all("pseudo-labels agree on 100.0000%" in r.note for r in semi)


def test_baselines_wrong_method_fails(tmp_path, capsys):
    """Run as the other baseline, each recorded sequence fails: the checks tell the methods apart."""
    with np.load(BASELINES_NPZ) as f:
        data = {k: f[k] for k in f.files}
    swapped = {k: v for k, v in data.items() if not k.startswith(("semi_step/", "sup_step/"))}
    swapped.update({"sup_step/" + k[len("semi_step/"):].replace("loss_x", "loss"): v
                    for k, v in data.items()
                    if k.startswith(("semi_step/lrs", "semi_step/loss_x", "semi_step/state1/"))})
    status, out = run_main(tmp_path, swapped, capsys)
    assert status == 1
    assert "FAIL sup_step 0 losses" in out and "FAIL sup_step state1" in out


def test_perturbed_reference_fails(tmp_path, recorded, capsys):
    """The verifier must notice a wrong output and exit non-zero."""
    data = subset(recorded, "eval_single/", "miou/")
    data["eval_single/logits"] = data["eval_single/logits"] * (1 + 1e-3)
    data["miou/union"] = data["miou/union"] + 1
    status, out = run_main(tmp_path, data, capsys)
    assert status == 1
    assert "FAIL eval_single " in out and "FAIL eval_single_bucketed" in out
    assert "FAIL miou counting" in out
    assert "0 cases ok, 3 failed" in out


def test_file_without_cases_fails(tmp_path, recorded, capsys):
    status, out = run_main(tmp_path, subset(recorded), capsys)
    assert status == 1
    assert "no cases" in out and "0 cases ok" not in out


def test_non_finite_values_fail_by_name(tmp_path, recorded, capsys):
    data = subset(recorded, "eval_single/")
    data["eval_single/logits"] = data["eval_single/logits"].copy()
    data["eval_single/logits"][1, 2, 3, 4] = np.nan
    status, out = run_main(tmp_path, data, capsys)
    assert status == 1
    assert "FAIL eval_single" in out and "NON-FINITE reference logits: 1 NaN, 0 inf" in out
    assert "max rel inf" in out
    # on our side too, and a NaN never reads as a small error
    ref = np.ones((2, 3), np.float32)
    ours = ref.copy()
    ours[0, 1] = np.inf
    r = verify_reference.compare("case", {"a": (ref, ref), "b": (ours, ref)}, TRAINED_RTOL)
    assert not r.ok and r.max_rel == np.inf and "ours b: 0 NaN, 1 inf" in r.note
    ours[0, 1] = np.nan
    r = verify_reference.compare("case", {"b": (ours, ref)}, TRAINED_RTOL)
    assert not r.ok and "ours b: 1 NaN" in r.note


def test_biased_batchnorm_variance_fails_on_the_command_line(tmp_path, recorded, capsys):
    """A running variance updated with the biased batch variance is 5.9e-6 off: outside
    FORWARD_RTOL, inside TRAINED_RTOL, so the forward cases must use the former."""
    data = subset(recorded, "train_forward_nomem/", "train_forward_mem/")
    momentum, n = 0.1, 4 * 17 * 17  # torch's BN momentum; 4 images at the head's 17 x 17
    for key in [k for k in data if k.startswith("train_forward_") and k.endswith("running_var")]:
        old = recorded["state0/" + key.split("/after/")[1]].astype(np.float64)
        unbiased = (data[key] - (1 - momentum) * old) / momentum
        data[key] = ((1 - momentum) * old + momentum * unbiased * (n - 1) / n).astype(np.float32)
        rel = np.linalg.norm(data[key] - recorded[key]) / np.linalg.norm(recorded[key])
        assert FORWARD_RTOL < rel < TRAINED_RTOL
    status, out = run_main(tmp_path, data, capsys)
    assert status == 1
    assert "FAIL train_forward_nomem" in out and "FAIL train_forward_mem" in out


def test_result_lines_tell_a_fallback_pass_from_a_plain_pass():
    plain = verify_reference.Result("train_step grads0", 1e-6, 1e-7, True, TRAINED_RTOL)
    starred = verify_reference.Result("train_step grads0", 1e-6, 1e-7, True, TRAINED_RTOL,
                                      fallback="1 ReLU input(s) ... at (n, c, y, x) [2, 5, 3, 7]")
    assert plain.line().startswith("ok   ") and starred.line().startswith("ok*  ")
    assert "fallback: 1 ReLU input(s)" in starred.line() and "[2, 5, 3, 7]" in starred.line()


def test_gradient_fallback_is_bounded():
    """Gradients off by 1% are not ReLU-kink noise: with a threshold loose enough to find many
    near-zero ReLU inputs, the fallback refuses to flip more than MAX_KINK_FLIPS of them."""
    ref = reference()
    tx, _, tcfg = verify_reference.train_setup(ref)
    state = state_lib.create_train_state(ref.model, tx, jax.random.key(0), ref.x_l.shape[1],
                                         ema=False, variables=ref.variables)
    batch = verify_reference.reference_batches(ref, 1)[0]
    recorded_grads = release.from_state_dict(ref.prefixed("train_step/grads0/"),
                                             {"params": ref.variables["params"]})["params"]
    perturbed = jax.tree.map(lambda g: g * 1.01, recorded_grads)
    result = verify_reference.grads_case(ref, perturbed, state, batch, tx, tcfg,
                                         kink_fraction=1e-2)
    print(result.line())
    assert not result.ok and result.status == "FAIL" and not result.fallback
    assert f"more than the {MAX_KINK_FLIPS} that round-off can explain" in result.note


def test_file_that_is_not_a_reference_fails(tmp_path, recorded, capsys):
    status, out = run_main(tmp_path, {"meta_json": recorded["meta_json"]}, capsys)
    assert status == 1
    assert "not a reference file: it lacks inputs/x_l, inputs/x_u, inputs/mask_l, state0/*" in out


# -- UniMatch V2's DPT recordings (allspark_jax.tools.verify_dpt) ---------------------------------


def test_dpt_recordings_pass_and_a_perturbed_one_fails(tmp_path, capsys):
    """dpt_tiny.npz (its forward: layers and logits of every case) and dpt_tiny_eval.npz (its
    evaluate, alone and padded) pass; a copy with one logit tensor off by 1e-3 (its weights beside
    it) fails that case only; without its weights file it cannot be verified."""
    import os
    import shutil
    from reference_model import DATA
    files = [os.path.join(DATA, f) for f in ("dpt_tiny.npz", "dpt_tiny_eval.npz")]
    assert verify_reference.main(files) == 0
    out = capsys.readouterr().out
    assert "dpt_tiny.npz: 6 cases ok, 0 failed" in out
    assert "dpt_tiny_eval.npz: 2 cases ok, 0 failed" in out
    with np.load(files[1]) as f:
        data = {k: f[k] for k in f.files}
    data["image1_logits"] = data["image1_logits"] * (1 + 1e-3)
    np.savez(tmp_path / "dpt_tiny_eval.npz", **data)
    assert verify_reference.main([str(tmp_path / "dpt_tiny_eval.npz")]) == 1  # nothing beside it
    assert "cannot verify: " in capsys.readouterr().out
    for f in ("dpt_tiny.npz", "dpt_tiny.pth"):
        shutil.copy(os.path.join(DATA, f), tmp_path / f)
    assert verify_reference.main([str(tmp_path / "dpt_tiny_eval.npz")]) == 1
    out = capsys.readouterr().out
    assert "FAIL evaluate, each image alone" in out and "FAIL evaluate, one padded batch" in out
    os.remove(tmp_path / "dpt_tiny.pth")
    assert verify_reference.main([str(tmp_path / "dpt_tiny_eval.npz")]) == 1
    out = capsys.readouterr().out
    assert "cannot verify: " in out and "dpt_tiny.pth is missing" in out, out
