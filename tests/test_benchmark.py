"""allspark_jax.benchmark on a tiny model: every measurement runs and its figures are consistent.

Nothing here asserts a speed (speeds are machine facts, recorded in BENCHMARKS.md); the tests check
that the figures are computed from the right programs: FLOPs from XLA agree with the matmul formula,
the train step costs more than three inference passes, the profile attributes time to the phases
and modules that exist, scaling runs 1 and 2 devices at a fixed per-device batch, and the report /
JSON carry it all.
"""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from allspark_jax import errors
from allspark_jax import method as method_lib
from allspark_jax import train_step
from allspark_jax.benchmark import measure, pipeline, profile, programs, report
from run_config import ROOT, cli_flags, compilation_cache_off, subprocess_env, tiny_config


@pytest.fixture(scope="module")
def results():
    config = tiny_config()
    return measure.run(config, what=["matmul", "train", "infer", "profile", "pipeline", "compile"], steps=2,
                         warmup=1, per_device_batch=2, matmul_size=256, profile_steps=1,
                         pipeline_images=8, pipeline_image_size=48, log=lambda s: None)


def test_matmul_flops_are_xlas_and_the_formula(results):
    m = results["matmul"]
    assert m["flops"] == 2 * 256 ** 3
    assert m["xla_flops"] == pytest.approx(m["flops"], rel=1e-6)
    assert m["peak_tflops_per_s"] == pytest.approx(m["flops"] / m["seconds"] / 1e12)


def test_train_and_infer_figures(results):
    t, i = results["train"], results["infer"]
    assert results["batch"] == 2 * results["devices"]
    assert t["images_per_step"] == 2 * results["batch"] and i["images_per_step"] == results["batch"]
    for r in (t, i):
        assert len(r["times"]) == 2 and r["seconds"] == pytest.approx(sorted(r["times"])[0] / 2
                                                                     + sorted(r["times"])[1] / 2)
        assert r["images_per_s"] == pytest.approx(r["images_per_step"] / r["seconds"])
        assert r["compile_s"] > 0 and r["flops"] > 0
        assert 0 < r["utilisation"] == pytest.approx(
            r["flops"] / r["seconds"] / (results["matmul"]["peak_tflops_per_s"] * 1e12))
        parts = r["xla_memory_parts"]
        assert r["xla_memory_bytes"] == (parts["argument"] + parts["output"] - parts["alias"]
                                         + parts["temp"] + parts["generated_code"])
        assert r["host_peak_rss_bytes"] > 0
    # teacher pass on B + student forward and backward on 2B: well over 3 B-image forwards
    assert t["flops"] > 3 * i["flops"]
    # the donated state is an argument of the step and aliased to its output
    assert t["xla_memory_parts"]["alias"] > 0


def test_compile_only_matches_the_run_program(results):
    c, t = results["compile"], results["train"]
    assert c["flops"] == t["flops"] and c["xla_memory_bytes"] == t["xla_memory_bytes"]


def test_profile_attributes_time_to_phases_and_modules(results):
    p = results["profile"]
    assert p["ops_traced"] > 50 and p["op_seconds_per_step"] > 0
    assert {"teacher", "forward", "backward", "update"} <= set(p["phase"])
    assert set(p["phase"]) <= {"teacher", "forward", "backward", "update", "unattributed"}
    for group in ("phase", "module", "kind", "phase_module_kind"):
        assert sum(p[group].values()) == pytest.approx(p["op_seconds_per_step"], rel=1e-6)
    for module in ("encoder s1 attention", "encoder s4 mlp", "encoder s2 patch_embed", "allspark",
                   "head"):
        assert p["module"].get(module, 0) > 0, module
    assert "matmul" in p["kind"]


def test_pipeline_against_the_step(results):
    p = results["pipeline"]
    assert p["pipeline_examples_per_s"] > 0 and p["fed_step_seconds"] > 0
    assert p["step_examples_per_s"] == pytest.approx(results["batch"] / results["train"]["seconds"])
    assert p["pipeline_over_step"] == pytest.approx(p["pipeline_examples_per_s"]
                                                    / p["step_examples_per_s"])


def test_report_and_json(results):
    text = report.format_report(results)
    for word in ("matmul peak", "train", "infer", "profile", "by phase", "pipeline"):
        assert word in text
    assert json.loads(json.dumps(results))["train"]["flops"] == results["train"]["flops"]


@pytest.mark.parametrize("op_name, expected", [
    ("jit(step)/AllSparkSegmentor/backbone/block1_0/attn/dot_general", ("teacher",
                                                                        "encoder s1 attention")),
    ("jit(step)/jvp(AllSparkSegmentor)/backbone/block3_12/mlp/dwconv/conv", ("forward",
                                                                            "encoder s3 mlp")),
    ("jit(step)/transpose(jvp(AllSparkSegmentor))/backbone/patch_embed2/proj/conv",
     ("backward", "encoder s2 patch_embed")),
    ("jit(step)/transpose(jvp(AllSparkSegmentor))/backbone/norm4/add", ("backward",
                                                                        "encoder s4 norm")),
    ("jit(step)/jvp(AllSparkSegmentor)/backbone/block2_1/norm1/mul", ("forward", "encoder s2 norm")),
    ("jit(step)/jvp(AllSparkSegmentor)/allspark/attn/reshape", ("forward", "allspark")),
    ("jit(step)/AllSparkSegmentor/head/linear_fuse/conv", ("teacher", "head")),
    ("jit(step)/mul", ("update", "other")),
    ("", ("unattributed", "unattributed")),
])
def test_classify(op_name, expected):
    assert profile.classify(op_name) == expected


def test_hlo_op_names():
    text = """HloModule m

%f (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %add.1 = f32[4]{0} add(%p, %p), metadata={op_name="jit(f)/head/add"}
}

%g (q: f32[4]) -> f32[4] {
  %q = f32[4]{0} parameter(0)
  ROOT %convolution.2 = f32[4]{0} convolution(%q, %q), window={size=1}, metadata={op_name="jit(f)/transpose(jvp(m))/head/conv"}
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  %fusion.3 = f32[4]{0} fusion(%a), kind=kLoop, calls=%f, metadata={op_name="jit(f)/allspark/mul" stack_frame_id=1}
  %ynn_fusion.4 = f32[4]{0} fusion(%fusion.3), kind=kCustom, calls=%g
  ROOT %dot.1 = f32[4]{0} dot(%ynn_fusion.4, %a), lhs_contracting_dims={0}
}"""
    names = profile.hlo_op_names(text)
    assert names["fusion.3"] == ("fusion:add", "jit(f)/allspark/mul")
    assert names["ynn_fusion.4"] == ("fusion:convolution", "jit(f)/transpose(jvp(m))/head/conv")
    assert names["dot.1"] == ("dot", "")
    assert names["a"] == ("parameter", "")
    assert profile.op_kind(*names["ynn_fusion.4"][:1], "ynn_fusion.4") == "conv"


def test_eval_and_predict_speed_measurements():
    """Per-size programs compile once per size, buckets once; both predict the same pixels."""
    config = tiny_config(**{"eval.buckets": (48,), "eval.batch_size": 2})
    with compilation_cache_off():  # counts XLA compilations
        r = measure.run(config, what=["eval", "predict"], eval_images=6, eval_sizes=3,
                        eval_sides=(20, 40), log=lambda s: None)
    e = r["eval"]
    assert e["per_size"]["programs"] == 3 and e["bucketed"]["programs"] == 1
    # Tracing a new size compiles nothing else (static resize taps are computed in numpy).
    assert e["per_size"]["compilations"] == 3
    assert e["pixels_differing"] == 0 and e["speedup"] > 0
    assert r["predict"]["bucketed"]["seconds"] > 0 and r["predict"]["speedup"] > 0
    assert e["bucketed"]["memory"]["bucket"] == [48, 48]
    assert e["bucketed"]["memory"]["xla_memory_bytes"] > 0
    assert "eval: 6 images in 3 sizes" in report.format_report(r)


def test_unknown_measurement_is_named():
    with pytest.raises(ValueError, match="--what.*'speed'"):
        measure.run(tiny_config(), what=["speed"], log=lambda s: None)


def test_cli_scaling_at_fixed_per_device_batch(tmp_path):
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "allspark_jax.benchmark", "--config=configs/demo.py",
           *cli_flags(), "--what=scaling", "--devices=1,2", "--per_device_batch=1", "--steps=1",
           "--warmup=0", f"--json={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["scaling"]
    assert [(r["devices"], r["global_batch"]) for r in rows] == [(1, 1), (2, 2)]
    assert rows[0]["efficiency"] == pytest.approx(1.0)
    assert all(r["seconds"] > 0 and r["images_per_s"] > 0 for r in rows)
    assert "scaling (per-device batch 1)" in proc.stdout


def test_train_figures_of_the_baselines():
    """The step of each baseline method and of UniMatch V2's runs, counting the images it trains
    on (an unlabeled image once, whatever its views)."""
    for method in ("supervised", "semi", "unimatch_v2", "unimatch_v2_allspark"):
        # UniMatch V2's configs average the losses per group of a quarter of the batch
        out = measure.run(tiny_config(method=method), what=["train"], steps=1, warmup=0,
                          per_device_batch=4 if method.startswith("unimatch") else 2,
                          log=lambda s: None)
        t = out["train"]
        assert t["images_per_step"] == out["batch"] * (1 if method == "supervised" else 2)
        assert t["seconds"] > 0 and t["flops"] > 0


def test_a_batch_the_loss_groups_do_not_divide_is_named():
    with pytest.raises(errors.ConfigError, match=r"--per_device_batch=2 on 1 device\(s\) gives a "
                                                 r"global batch of 2, which config.train."
                                                 r"loss_groups=4 does not divide"):
        measure.run(tiny_config(method="unimatch_v2"), what=["train"], steps=1, warmup=0,
                    per_device_batch=2, log=lambda s: None)


def test_synthetic_batch_of_each_method():
    """The benchmark's resident batch holds the entries the method's step reads: UniMatch V2's two
    strong views and two boxes; the one-view entries do not change with the keys asked."""
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    one = programs.synthetic_batch(4, 8, 5, sharding, keys=train_step.BATCH_KEYS + ("cutmix_u",))
    for cutmix in (0.0, 0.5):
        method = method_lib.resolve("unimatch_v2", teacher="ema", student_view="strong",
                                    cutmix_prob=cutmix)
        keys = train_step.batch_keys(method)
        b = {k: np.asarray(v) for k, v in programs.synthetic_batch(4, 8, 5, sharding,
                                                                    keys=keys).items()}
        assert set(b) == set(keys)
        assert ("cutmix_u1" in b) == (cutmix > 0)
        for k in ("image_l", "image_u_w", "image_u_s1", "image_u_s2"):
            assert b[k].shape == (4, 8, 8, 3) and b[k].dtype == np.float32
        assert b["mask_l"].dtype == np.int32 and b["pad_u"].dtype == bool
        assert not np.array_equal(b["image_u_s1"], b["image_u_s2"])
        for k in ("image_l", "mask_l", "image_u_w", "pad_u"):
            np.testing.assert_array_equal(b[k], np.asarray(one[k]))
    for k in ("cutmix_u1", "cutmix_u2"):
        assert b[k].shape == (4, 8, 8) and b[k].dtype == bool and b[k].sum() == 2 * 16
    assert not np.array_equal(b["cutmix_u1"], b["cutmix_u2"])


def test_pipeline_options_follow_the_method(tmp_path):
    """The pipeline measurement reads what the method's step reads (UniMatch V2: two strong
    views)."""
    from allspark_jax.data import input_pipeline, synthetic
    synthetic.write_dataset(str(tmp_path), 8, 0, 48, 5, seed=0, num_labeled=4)
    opts = pipeline.make_options(str(tmp_path), 32, 2, method="unimatch_v2", teacher="ema")
    b = next(input_pipeline.create_train_iterator(opts, process_index=0, process_count=1))
    assert set(train_step.batch_keys(opts.method)) == set(b)
    assert b["image_u_s2"].shape == (2, 32, 32, 3)


def test_cli_refuses_a_bad_config_in_one_line():
    """The benchmark validates its config as main.py does: one `error:` line, exit status 2."""
    cmd = [sys.executable, "-m", "allspark_jax.benchmark", "--config=configs/demo.py",
           "--config.model.encoder=dinov2", "--what=compile"]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: config.model.decoder_dim=64: expected 768 (its configs/default.py value): only "
        "model.encoder 'mit' reads it (model.encoder='dinov2')")
