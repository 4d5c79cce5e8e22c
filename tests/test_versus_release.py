"""allspark_jax.benchmark.versus_release end to end against a FAKE release script (no torch needed).

The fake `bench_release.py` takes the release script's flags, logs each call and writes the JSON the
real one writes, with a median that falls from call to call; ours runs for real on MiT-B0 at a
32 px crop. Checked: the sides alternate (release, ours, release, ours), each side's figure is the
lower of its per-round medians, the ratio and the table, and that a release result for another
case is refused.
"""
import json
import subprocess
import sys

import pytest

from allspark_jax.benchmark import versus_release
from run_config import ROOT, subprocess_env

FAKE_RELEASE = '''
import argparse, json, os
p = argparse.ArgumentParser()
for name in ("--variant", "--method", "--json"):
    p.add_argument(name)
for name in ("--size", "--batch", "--decoder_dim", "--num_classes", "--iters"):
    p.add_argument(name, type=int)
p.add_argument("--infer", action="store_true")
a = p.parse_args()
log = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calls.log")
calls = open(log).read().count("\\n") if os.path.exists(log) else 0
with open(log, "a") as f:
    f.write(f"{a.variant} {a.size} {a.batch} {a.decoder_dim} {a.method} {a.num_classes} "
            f"{a.iters} {a.infer}\\n")
median = 9.0 / (calls + 1)  # 9 s, then 4.5 s: the lower median is the second round's
res = {"what": "infer" if a.infer else "train", "variant": a.variant, "size": a.size,
       "batch": a.batch, "decoder_dim": a.decoder_dim, "method": a.method, "threads": 2,
       "torch": "fake", "median_s": median, "first_s": 2 * median, "times": [median] * a.iters}
print("release ... median", median)
with open(a.json, "w") as f:
    json.dump(res, f, indent=2)
'''


def test_alternates_and_tabulates_against_a_fake_release(tmp_path):
    release = tmp_path / "release"
    release.mkdir()
    (release / "bench_release.py").write_text(FAKE_RELEASE)
    out = tmp_path / "versus.json"
    cmd = [sys.executable, "-m", "allspark_jax.benchmark.versus_release",
           f"--release_dir={release}", f"--release_python={sys.executable}",
           "--case=train:b0:32:1:16:allspark", "--rounds=2", "--steps=1", "--warmup=0",
           f"--json={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    # the release script got the case's model, crop, batch, decoder width, method and steps
    assert (release / "calls.log").read_text().splitlines() == ["b0 32 1 16 allspark 21 1 False"] * 2
    assert [(o["side"], o["round"]) for o in r["order"]] == [
        ("release", 0), ("ours", 0), ("release", 1), ("ours", 1)]
    assert all(a["end"] <= b["start"] for a, b in zip(r["order"], r["order"][1:]))
    (c,) = r["cases"]
    assert c["release_s"] == [9.0, 4.5] and c["release_best_s"] == 4.5
    assert len(c["ours_s"]) == 2 and c["ours_best_s"] == min(c["ours_s"]) > 0
    assert c["ratio"] == pytest.approx(c["ours_best_s"] / 4.5)
    assert r["torch"] == "fake" and r["backend"] == "cpu" and r["rounds"] == 2
    row = f"| {c['label']} | 9.000, 4.500 |"
    assert row in proc.stdout and f"| {c['ratio']:.2f} |" in proc.stdout
    assert c["label"] == "train, MiT-B0, 32 px, 1 + 1, decoder 16, allspark"


def test_cases_and_results_are_checked():
    assert versus_release.parse_case("infer:b5:513:1:768") == versus_release.Case(
        "infer", "b5", 513, 1, 768, "allspark")
    assert [versus_release.parse_case(c).method for c in versus_release.DEFAULT_CASES][-2:] == [
        "semi", "supervised"]
    for spec, msg in (("train:b0:257:2", "expected WHAT"), ("fit:b0:257:2:256", "WHAT must"),
                      ("train:b9:257:2:256", "BACKBONE"), ("train:b0:x:2:256", "integers"),
                      ("train:b0:257:2:256:mean", "METHOD")):
        with pytest.raises(ValueError, match=msg):
            versus_release.parse_case(spec)
    case = versus_release.parse_case("train:b0:257:2:256:supervised")
    cmd = versus_release.release_command("/rel", "/py", case, 3, 21, "/o.json")
    assert cmd[cmd.index("--method") + 1] == "sup" and "--infer" not in cmd
    good = {"what": "train", "variant": "b0", "size": 257, "batch": 2, "decoder_dim": 256,
            "method": "sup", "median_s": 0.5}
    assert versus_release.release_seconds(good, case) == 0.5
    with pytest.raises(ValueError, match="measured {'size': 513}"):
        versus_release.release_seconds({**good, "size": 513}, case)
    with pytest.raises(ValueError, match="lacks \\['median_s'\\]"):
        versus_release.release_seconds({k: v for k, v in good.items() if k != "median_s"}, case)
    with pytest.raises(ValueError, match="bench_release.py"):
        versus_release.run("/nonexistent", sys.executable, [case], rounds=1, steps=1, warmup=0,
                           num_classes=21, config="configs/pascal.py")
