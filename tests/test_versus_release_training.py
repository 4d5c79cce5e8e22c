"""allspark_jax.experiments.versus_release_training end to end against a FAKE release runner (no
torch), and `train.train_and_evaluate(batches=..., on_step=...)`, which it drives ours with.

The fake runner takes the real one's command line (`--release DIR --spec spec.json`), records what
the spec and the written batches hold, and "trains" by returning the start unchanged with made-up
losses; ours runs for real on a tiny learning task. Checked: the spec (architecture, the release's
config, lists, start), the batches written once (shapes, one unlabeled view, none for the
supervised trainer, none with `own`), our run reused across batch sources, the release's weights
scored by our evaluator, the comparison figures and the table.
"""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

import run_config
from allspark_jax import config as config_lib
from allspark_jax import train
from allspark_jax.data import input_pipeline
from allspark_jax.experiments import run_comparison
from allspark_jax.experiments import versus_release_training as vrt

FAKE_RUNNER = '''
import argparse, json, os
import numpy as np
p = argparse.ArgumentParser()
p.add_argument("--release")
p.add_argument("--spec")
a = p.parse_args()
spec = json.load(open(a.spec))
assert os.path.isdir(a.release), a.release
seen = {"lists": {k: len(open(spec["data"][k]).read().splitlines())
                  for k in ("labeled", "unlabeled", "val")}}
if spec["batches"]:
    seen["batches"] = {k[:-4]: [list(np.load(os.path.join(spec["batches"], k)).shape),
                                str(np.load(os.path.join(spec["batches"], k)).dtype)]
                       for k in sorted(os.listdir(spec["batches"]))}
steps = spec["cfg"]["epochs"] * (seen["lists"]["labeled"] if spec["method"] == "supervised"
                                 else seen["lists"]["unlabeled"]) // spec["cfg"]["batch_size"]
tags = ["train/loss_all", "train/loss_x"] + ([] if spec["method"] == "supervised" else
                                             ["train/loss_u" if spec["method"] == "allspark"
                                              else "train/loss_w_fp"])
losses = {t: [1.0 + 0.01 * i for i in range(steps)] for t in tags}
with np.load(spec["init"]) as f:
    np.savez(os.path.join(spec["out"], "final.npz"), **{k: f[k] for k in f.files})
    for n in spec["states_at"]:
        np.savez(os.path.join(spec["out"], f"state_{n}.npz"), **{k: f[k] for k in f.files})
with open(os.path.join(spec["out"], "losses.json"), "w") as f:
    # the fake's memory never moves: its write pointers stay at the start's
    ptr = [[0] * spec["architecture"]["num_classes"]] * steps if spec["method"] == "allspark" else []
    json.dump({"losses": losses, "miou": 12.5, "seconds": 0.1, "torch": "fake",
               "queue_ptr": ptr}, f)
with open(os.path.join(spec["out"], "seen.json"), "w") as f:
    json.dump(seen, f)
'''

# A learning task small enough for the suite that the release's trainers accept: 8 steps an epoch
# (they log every steps // 8), whole supervised epochs (4 labeled images, 2 a step), a crop whose
# last token grid the release's memory size formula gives (33 px: 2 x 2).
TINY = dict(data__synthetic__num_train=20, data__synthetic__num_labeled=4,
            data__synthetic__num_val=4, data__synthetic__size=40, data__crop_size=33,
            data__batch_size=2, train__epochs=1, train__warmup_epoch=0, eval__crop_size=33,
            eval_every_steps=10**9, checkpoint_every_steps=10**9, learning__pretrain_steps=0)


def test_train_and_evaluate_reads_the_given_batches_and_reports_every_step(tmp_path):
    """A run fed its own pipeline's batches (`batches=`) ends bitwise where the pipeline's run
    ends; `on_step` sees every step's losses."""
    config = run_config.tiny_config(eval_every_steps=10**9, checkpoint_every_steps=10**9,
                                    train__num_train_steps=4)
    seen = {"pipeline": [], "given": []}
    a = train.train_and_evaluate(config, str(tmp_path / "a"),
                                 on_step=lambda s, m, _: seen["pipeline"].append((s, m)))
    opts = config_lib.data_options(config, str(tmp_path / "a"))
    it = input_pipeline.create_train_iterator(opts, plan=input_pipeline.train_plan(opts))
    batches = [next(it) for _ in range(4)]
    it.close()
    b = train.train_and_evaluate(config, str(tmp_path / "b"), batches=batches,
                                 on_step=lambda s, m, _: seen["given"].append((s, m)))
    assert a["step"] == b["step"] == 4
    assert [s for s, _ in seen["given"]] == [1, 2, 3, 4]
    assert seen["given"] == seen["pipeline"]
    assert {"loss", "loss_x", "loss_u"} <= set(seen["given"][0][1])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a["state"].params),
                 jax.device_get(b["state"].params))
    # other batches, another run
    c = train.train_and_evaluate(config, str(tmp_path / "c"), batches=batches[1:] + batches[:1])
    assert not np.array_equal(jax.device_get(c["state"].params["head"]["linear_pred"]["kernel"]),
                              jax.device_get(a["state"].params["head"]["linear_pred"]["kernel"]))


def test_end_to_end_against_a_fake_release(tmp_path):
    release = tmp_path / "release"
    release.mkdir()
    runner = tmp_path / "fake_runner.py"
    runner.write_text(FAKE_RUNNER)
    out, workdir = tmp_path / "out.json", tmp_path / "work"
    cmd = [sys.executable, "-m", "allspark_jax.experiments.versus_release_training",
           "--config", "configs/learning.py", f"--release_dir={release}",
           f"--release_python={sys.executable}", f"--release_runner={runner}",
           "--methods", "supervised,allspark", "--seeds", "0", "--batches", "own,same",
           "--states_at=2,5",
           "--json", str(out), "--workdir", str(workdir), *run_config.cli_flags(**TINY)]
    proc = subprocess.run(cmd, cwd=run_config.ROOT, env=run_config.subprocess_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    runs = data["runs"]
    assert [(r["method"], r["batches"]) for r in runs] == [
        ("supervised", "same"), ("supervised", "own"), ("allspark", "same"), ("allspark", "own")]
    for method, steps, epochs, n_labeled_batches in (("supervised", 8, 4, 8), ("allspark", 8, 1, 8)):
        same, own = (r for r in runs if r["method"] == method)
        run_dir = workdir / "runs" / f"{method}_seed0_same"
        spec = json.loads((run_dir / "release" / "spec.json").read_text())
        seen = json.loads((run_dir / "release" / "seen.json").read_text())
        # the release's config and architecture are the run's
        assert spec["method"] == method and spec["seed"] == 0 and spec["dropout"] is False
        assert spec["cfg"]["epochs"] == epochs and spec["cfg"]["batch_size"] == 2
        assert spec["cfg"]["crop_size"] == 33 and spec["cfg"]["nclass"] == 5
        assert spec["architecture"]["embed_dims"] == [8, 16, 24, 32]
        if method == "allspark":  # the memory read from the first epoch on
            assert spec["architecture"]["warmup_epoch"] == 0
        assert seen["lists"] == {"labeled": 4, "unlabeled": 16, "val": 4}
        # the batches, written once: step-major, one unlabeled view, none for supervised
        want = {"image_l": [[n_labeled_batches, 2, 33, 33, 3], "float32"],
                "mask_l": [[n_labeled_batches, 2, 33, 33], "int32"]}
        if method == "allspark":
            want.update(image_u=[[8, 2, 33, 33, 3], "float32"], pad_u=[[8, 2, 33, 33], "bool"])
        assert {k: v[0] for k, v in seen["batches"].items()} == {k: v[0] for k, v in want.items()}
        assert seen["batches"]["image_l"][1] == "float32"
        own_spec = json.loads((workdir / "runs" / f"{method}_seed0_own" / "release" /
                               "spec.json").read_text())
        assert own_spec["batches"] is None
        assert not (run_dir / "batches").exists()  # removed after the run
        # the start, in the release's names: the memory only with AllSpark
        with np.load(spec["init"]) as f:
            names = set(f.files)
        assert ("decoder.allspark.attn.kv_queue" in names) == (method == "allspark")
        assert "backbone.patch_embed1.proj.weight" in names
        # ours ran once for both batch sources; the release's losses as its trainer logged them
        assert same["ours"] == own["ours"] and len(same["ours"]["losses"]["loss"]) == steps
        want_losses = {"loss", "loss_x"} | ({"loss_u"} if method == "allspark" else set())
        assert set(same["release"]["losses"]) == want_losses
        assert same["release"]["losses"]["loss"] == [1.0 + 0.01 * i for i in range(steps)]
        assert same["release"]["miou_release_evaluate"] == 12.5
        # the release's final weights (the fake's: its start) scored by our evaluator
        assert 0.0 <= same["release"]["miou"] <= 100.0
        assert same["release"]["miou"] == own["release"]["miou"]
        assert same["miou_diff"] == pytest.approx(same["ours"]["miou"] - same["release"]["miou"])
        assert same["params_rel_diff"] > 0  # ours trained, the fake did not
        assert same["first_step_over"] == {
            str(t): run_comparison.first_step_over(same["ours"]["losses"]["loss"],
                                        same["release"]["losses"]["loss"], t)
            for t in vrt.TOLERANCES}
        # --states_at: both sides' states after steps 2 and 5, tensor by tensor (the fake's: its
        # start, which ours has left)
        assert spec["states_at"] == [2, 5] and set(same["states"]) == {"2", "5"}
        for n in ("2", "5"):
            worst = same["states"][n]["worst"]
            assert len(worst) == 5 and worst[0][1] >= worst[-1][1] > 0
            assert ("queue_ptr" in same["states"][n]) == (method == "allspark")
        ptr = same["states"]["5"].get("queue_ptr")
        if ptr:  # the fake's pointers are the start's; ours have moved on, one per class
            assert ptr["release"] == [0] * 5 and len(ptr["ours"]) == 5
        # the memory's parting: AllSpark on the same batches only; ours writes at step 1
        assert ("memory_parting" in same) == (method == "allspark")
        assert "memory_parting" not in own
        if method == "allspark":
            parted = same["memory_parting"]
            assert parted["step"] == 1 and parted["release_ptr"] == [0] * 5
            assert parted["ours_ptr"] != [0] * 5 and len(parted["ours_ptr"]) == 5
            # 2 images x 32 channels written, each class's count modulo the FIFO's 32 slots
            assert sum(parted["ours_minus_release_writes"].values()) % 32 == (2 * 32) % 32
            delta = {int(k): v for k, v in parted["ours_minus_release_writes"].items()}
            margins = [c["margin"] for c in parted["candidates"]]
            assert margins == sorted(margins) and len(margins) <= 5
            for c in parted["candidates"]:  # ours gained a write where the runner-up lost one
                assert delta[c["ours_class"]] > 0 > delta[c["runner_up"]]
            assert 0 <= parted["smallest_margin"] <= parted["median_margin"]
            assert "the memory's write pointers part after step 1" in proc.stdout
    assert "| allspark | 0 | same |" in proc.stdout and "| supervised | 0 | own |" in proc.stdout


def test_comparison_figures():
    assert run_comparison.first_step_over([1.0, 2.0, 3.0], [1.0, 2.001, 3.1], 1e-3) == 3
    assert run_comparison.first_step_over([1.0, 2.0, 3.0], [1.0, 2.003, 3.1], 1e-3) == 2
    assert run_comparison.first_step_over([1.0, 2.0], [1.0, 2.0, 9.0], 1e-3) is None  # compared where both ran
    np.testing.assert_allclose(run_comparison.relative_diff([1.0, 0.0, 0.0], [2.0, 0.0, 1.0]), [0.5, 0.0, 1.0])
    ours = {"w": np.array([3.0, 4.0]), "b": np.array([0.0]), "bn.running_mean": np.array([1.0])}
    release = {"w": np.array([3.0, 0.0]), "b": np.array([1.0]), "bn.running_mean": np.array([2.0]),
               "bn.num_batches_tracked": np.array(3)}
    d = run_comparison.state_diff(ours, release, {"w", "b"})
    assert d["params_rel_diff"] == pytest.approx(np.sqrt(17 / 10))
    assert d["params_worst"] == {"name": "w", "max_abs_diff": 4.0}
    assert d["buffers_rel_diff"] == pytest.approx(0.5)


def test_memory_parting_names_the_channel_that_flipped():
    """One channel whose two best classes nearly tie: the side that put it under class 0 wrote one
    more channel to class 0's FIFO and one fewer to class 1's (pointers modulo C = 4)."""
    sim = np.array([[[0.9, 0.5, 0.30000003, 0.1],     # class 0
                     [0.1, 0.6, 0.3, 0.2],            # class 1
                     [0.3, 0.1, 0.2, 0.15]]])         # class 2: (b=1, K=3, C=4)
    np.testing.assert_allclose(run_comparison.channel_margins(sim), [[0.6, 0.1, 3e-8, 0.05]], rtol=1e-6)
    out = run_comparison.memory_parting(7, ours_ptr=[1, 3, 1], release_ptr=[0, 0, 1],
                             internals={"channel_class_similarity": sim})
    assert out["step"] == 7 and out["ours_minus_release_writes"] == {0: 1, 1: -1}
    [cand] = out["candidates"]
    assert (cand["image"], cand["channel"], cand["ours_class"], cand["runner_up"]) == (0, 2, 0, 1)
    assert cand["margin"] == pytest.approx(3e-8, rel=1e-6) == out["smallest_margin"]
    assert cand["similarity"] == pytest.approx(0.30000003)
    # every class's closest calls, smallest margin first
    assert [(c["channel"], c["ours_class"], c["runner_up"]) for c in out["closest"]] == [
        (2, 0, 1), (3, 1, 2), (1, 1, 0), (0, 0, 2)]
    # the other way round (class 1 gained, 0 lost): channel 1, class 1 over class 0 by 0.1
    [cand] = run_comparison.memory_parting(7, [0, 0, 1], [1, 3, 1], {"channel_class_similarity": sim}
                                )["candidates"]
    assert (cand["channel"], cand["ours_class"], cand["runner_up"]) == (1, 1, 0)
    assert cand["margin"] == pytest.approx(0.1)


def test_the_release_recipe_is_required():
    config = config_lib.load_config("configs/learning.py")
    config.data.crop_size = 65
    vrt.check_release_recipe(config, "allspark")
    ema = config_lib.load_config("configs/learning.py")
    ema.data.crop_size, ema.train.teacher = 65, "ema"
    with pytest.raises(ValueError, match=r"--config.train.teacher='ema': the release's trainer "
                       r"for 'allspark' runs 'online'"):
        vrt.check_release_recipe(ema, "allspark")
    # a crop that is a multiple of 32: the release's memory holds 9 tokens, the map has 4
    with pytest.raises(ValueError, match=r"--config.data.crop_size=64: the release sizes its "
                       r"Semantic Memory for \(crop // 32 \+ 1\)\^2 = 9 tokens, but a 64 px crop "
                       r"has 2\^2"):
        vrt.check_release_recipe(config_lib.load_config("configs/learning.py"), "allspark")
    vrt.check_release_recipe(config_lib.load_config("configs/learning.py:supervised"), "supervised")


@pytest.mark.parametrize("flag, message", [
    ("--methods=unimatch_v2", "--methods=unimatch_v2: expected a subset of supervised, semi, "
                              "allspark"),
    ("--batches=theirs", "--batches=theirs: expected a subset of same, own"),
    ("--release_python=/nonexistent/python", "--release_python='/nonexistent/python' is not an "
                                             "executable file"),
])
def test_bad_flags_are_refused(tmp_path, flag, message):
    cmd = [sys.executable, "-m", "allspark_jax.experiments.versus_release_training",
           "--config", "configs/learning.py", f"--release_dir={tmp_path}",
           f"--release_python={sys.executable}", flag]
    proc = subprocess.run(cmd, cwd=run_config.ROOT, env=run_config.subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
