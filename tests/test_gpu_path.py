"""The accelerator path: what runs without TensorFlow, TFDS and clu; the precision key; start-up per
backend; the release's bench script on CUDA (against a fake torch); the GPU run's script, dry-run on
the CPU at tiny sizes.

The GPU machine the run is meant for has JAX with CUDA, flax, optax, orbax and torch, but no
TensorFlow, TFDS or clu: the subprocesses here make those imports fail (a sitecustomize on
PYTHONPATH), so that a module that needs them at import fails the test.
"""
import json
import os
import stat
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from allspark_jax import errors
from allspark_jax import config as config_lib
from allspark_jax import runtime
from allspark_jax.benchmark import versus_release
from conftest import make_config
from reference_model import REFERENCE_NPZ
from run_config import ROOT, subprocess_env

BLOCKED = ("tensorflow", "tensorflow_datasets", "clu")
BLOCKER = f'''
import sys
class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"{{name}} is not installed here (blocked by the test)")
        return None
sys.meta_path.insert(0, _Blocked())
'''


def blocked_env(tmp_path) -> dict:
    site = tmp_path / "blocker"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = subprocess_env()
    env["PYTHONPATH"] = str(site) + os.pathsep + env["PYTHONPATH"]
    return env


def small_reference(tmp_path) -> str:
    """The reference file's loss and mIoU cases only (seconds to verify)."""
    path = tmp_path / "small_reference.npz"
    with np.load(REFERENCE_NPZ) as f:
        np.savez(path, **{k: f[k] for k in f.files if k == "meta_json"
                          or k.startswith(("state0/", "inputs/", "loss/", "miou/"))})
    return str(path)


def run(cmd, env, timeout=900):
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# ------------------------------------------------------------------------- without TensorFlow


EVALUATE_WITHOUT_TF = '''
import sys
import numpy as np
from allspark_jax.evaluation import evaluator
from allspark_jax.models.segmentor import init_variables
from run_config import tiny_config
try:
    import tensorflow
except ImportError:
    pass
else:
    raise SystemExit("the blocker let tensorflow through")
config = tiny_config()
predictor = evaluator.make_predictor(config)
import jax
variables = jax.jit(lambda r: init_variables(predictor.model, r, 32))(jax.random.key(0))
rng = np.random.default_rng(0)
examples = [{"image": rng.normal(size=(40, 36, 3)).astype(np.float32),
             "mask": rng.integers(0, 5, (40, 36))} for _ in range(2)]
r = evaluator.evaluate(predictor, variables, examples, int(config.data.num_classes))
assert r["num_images"] == 2, r
print("evaluated", r["miou"], sorted(m for m in sys.modules if m.split(".")[0] in %r))
'''


def test_model_step_evaluation_verifier_and_benchmark_run_without_tensorflow(tmp_path):
    env = blocked_env(tmp_path)
    env["PYTHONPATH"] = os.path.join(ROOT, "tests") + os.pathsep + env["PYTHONPATH"]
    # the benchmark's model measurements: train step, inference, compile, matmul, profile
    out = tmp_path / "bench.json"
    run([sys.executable, "-m", "allspark_jax.benchmark", "--config.model.backbone=b0",
         "--config.data.crop_size=32", "--config.model.decoder_dim=16",
         "--config.model.precision=highest", "--per_device_batch=1",
         "--what=train,infer,compile,matmul,profile", "--steps=1", "--warmup=0",
         "--matmul_size=64", "--profile_steps=1", f"--json={out}", "--quiet"], env)
    r = json.loads(out.read_text())
    assert {"train", "infer", "compile", "matmul", "profile"} <= set(r)
    assert r["precision"] == "highest" and r["train"]["seconds"] > 0
    # the verifier, which names backend and precision
    proc = run([sys.executable, "-m", "allspark_jax.tools.verify_reference",
                small_reference(tmp_path), "--precision=default"], env)
    assert proc.stdout.startswith("backend cpu (cpu), precision default, jax ")
    assert "2 cases ok, 0 failed" in proc.stdout
    # the evaluation programs (a Predictor's bucketed programs through evaluator.evaluate)
    proc = run([sys.executable, "-c", EVALUATE_WITHOUT_TF % (BLOCKED,)], env)
    assert "evaluated" in proc.stdout and proc.stdout.strip().endswith("[]")


def test_the_blocker_blocks(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import tensorflow"], env=blocked_env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode and "blocked by the test" in proc.stderr
    # ... and the input pipeline, which does need TensorFlow, fails there
    proc = subprocess.run([sys.executable, "-c", "import allspark_jax.data.input_pipeline"],
                          env=blocked_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode and "blocked by the test" in proc.stderr


# ------------------------------------------------------------------------------- precision


def test_precision_key_is_validated():
    config = make_config()
    assert config.model.precision == "default"
    config_lib.validate(config)
    config.model.precision = "tf32"
    with pytest.raises(errors.ConfigError, match="model.precision.*'default', 'high', 'highest'"):
        config_lib.validate(config)


def _highest_ops(config) -> int:
    """Matrix products and convolutions at HIGHEST in the tiny model's lowered eval forward."""
    from allspark_jax.models.segmentor import build_model, init_variables
    from run_config import tiny_config
    base = tiny_config()
    model = build_model(base)
    variables = jax.eval_shape(lambda r: init_variables(model, r, 32), jax.random.key(0))
    runtime.apply_precision(config)
    try:
        text = jax.jit(lambda v, x: model.apply(v, x, mode="eval")).lower(
            variables, jnp.zeros((1, 32, 32, 3))).as_text()
    finally:
        runtime.set_matmul_precision("default")
    return text.count("precision HIGHEST>") + text.count("precision = [HIGHEST, HIGHEST]")


def test_precision_reaches_every_matmul_and_convolution():
    config = make_config()
    config.model.precision = "default"
    default = _highest_ops(config)  # the model's own explicit HIGHEST (resize, memory scores)
    config.model.precision = "highest"
    highest = _highest_ops(config)
    assert highest > default + 20, (default, highest)
    assert runtime.matmul_precision() == "default"


def test_start_applies_the_precision(tmp_path):
    code = ("import os, jax\nfrom allspark_jax import config as c, runtime\n"
            f"cfg = c.load_config({os.path.join(ROOT, 'configs', 'demo.py')!r})\n"
            "cfg.model.precision = 'high'\nruntime.start(cfg)\n"
            "print(jax.config.jax_default_matmul_precision, runtime.matmul_precision())\n")
    proc = run([sys.executable, "-c", code], subprocess_env(), timeout=300)
    assert proc.stdout.split() == ["high", "high"]


# ----------------------------------------------------------------------- start-up per backend


def test_xla_cpu_flags_only_where_jax_runs_on_the_cpu_alone():
    flags = ["--xla_cpu_enable_concurrency_optimized_scheduler=false", "--xla_dump_to=/tmp/x"]
    assert runtime.xla_flags_for_backend(flags, accelerator=False) == flags
    assert runtime.xla_flags_for_backend(flags, accelerator=True) == ["--xla_dump_to=/tmp/x"]
    code = ("import os\nfrom allspark_jax import config as c, runtime\n"
            f"cfg = c.load_config({os.path.join(ROOT, 'configs', 'default.py')!r})\n"
            "print(runtime.accelerator_possible())\nruntime.set_xla_flags(cfg)\n"
            "print(repr(os.environ.get('XLA_FLAGS', '')))\n")
    for platforms in ("cpu", "cuda,cpu"):
        on_cpu = platforms == "cpu"
        env = subprocess_env()
        env["JAX_PLATFORMS"] = platforms
        env.pop("XLA_FLAGS", None)
        out = run([sys.executable, "-c", code], env, timeout=300).stdout.split("\n")
        assert out[0] == str(not on_cpu), out
        assert ("xla_cpu_enable_concurrency" in out[1]) == on_cpu, out


def test_tensorflow_is_kept_off_gpus_and_tpus(monkeypatch):
    from allspark_jax.data import host_tensorflow
    calls = []
    monkeypatch.setattr(host_tensorflow.tf.config, "set_visible_devices",
                        lambda devices, kind: calls.append((list(devices), kind)))
    runtime.hide_accelerators_from_tensorflow()
    assert calls == [([], "GPU"), ([], "TPU")]

    def refuse(devices, kind):
        raise RuntimeError("Visible devices cannot be modified after being initialized")
    monkeypatch.setattr(host_tensorflow.tf.config, "set_visible_devices", refuse)
    with pytest.raises(RuntimeError, match="before its GPUs were hidden"):
        host_tensorflow.keep_off_accelerators()


# ------------------------------------------------------------ the release's script on CUDA

# A stand-in for torch with a CUDA device: logs what the wrapper does to it.
FAKE_TORCH = '''
import json, os, types
__version__ = "0.0-fake-cuda"
def _log(*event):
    with open(os.environ["FAKE_TORCH_LOG"], "a") as f:
        f.write(json.dumps(event) + "\\n")
class device:
    def __init__(self, name):
        self.type = str(name).split(":")[0]
_default = [None]
def set_default_device(name):
    _default[0] = name
    _log("set_default_device", name)
def get_default_device():
    return _default[0]
class _Cuda:
    def is_available(self): return True
    def synchronize(self): _log("synchronize")
    def reset_peak_memory_stats(self): _log("reset_peak_memory_stats")
    def get_device_name(self): return "Fake GPU"
    def max_memory_allocated(self): return 123
    def max_memory_reserved(self): return 456
cuda = _Cuda()
backends = types.SimpleNamespace(
    cudnn=types.SimpleNamespace(enabled=False, benchmark=False, allow_tf32=True),
    cuda=types.SimpleNamespace(matmul=types.SimpleNamespace(allow_tf32=False)))
'''

# bench_release.py's flags and JSON; it builds on the default device and times with perf_counter.
FAKE_BENCH = '''
import argparse, json, os, time
import torch
p = argparse.ArgumentParser()
for name in ("--variant", "--method", "--json"):
    p.add_argument(name)
for name in ("--size", "--batch", "--decoder_dim", "--num_classes", "--iters"):
    p.add_argument(name, type=int)
p.add_argument("--infer", action="store_true")
a = p.parse_args()
built_on = torch.get_default_device()
torch._log("built", built_on, torch.backends.cudnn.benchmark)
times = []
for _ in range(a.iters + 1):
    t = time.perf_counter()
    torch._log("iteration", torch.get_default_device())
    times.append(time.perf_counter() - t)
res = {"what": "infer" if a.infer else "train", "variant": a.variant, "size": a.size,
       "batch": a.batch, "decoder_dim": a.decoder_dim, "method": a.method, "threads": 2,
       "torch": torch.__version__, "median_s": 0.25, "first_s": 0.5, "times": [0.25] * a.iters}
with open(a.json, "w") as f:
    json.dump(res, f)
'''


def fake_release(tmp_path):
    """(release dir with the fake bench script, a release Python that imports the fake torch,
    the fake torch's log)."""
    (tmp_path / "faketorch" / "torch").mkdir(parents=True)
    (tmp_path / "faketorch" / "torch" / "__init__.py").write_text(FAKE_TORCH)
    (tmp_path / "release").mkdir()
    (tmp_path / "release" / "bench_release.py").write_text(FAKE_BENCH)
    log = tmp_path / "torch.log"
    python = tmp_path / "release_python"
    python.write_text(f'#!/bin/sh\nexport PYTHONPATH="{tmp_path / "faketorch"}:$PYTHONPATH" '
                      f'FAKE_TORCH_LOG="{log}"\nexec "{sys.executable}" "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return tmp_path / "release", str(python), log


def events(log):
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.parametrize("precision", ["release", "tf32"])
def test_release_on_cuda_builds_there_waits_for_it_and_records_it(tmp_path, precision):
    release, python, log = fake_release(tmp_path)
    case = versus_release.parse_case("train:b5:513:2:768")
    out = tmp_path / "r.json"
    cmd = versus_release.release_command(str(release), python, case, 3, 21, str(out), "cuda",
                                         precision)
    assert cmd[1] == versus_release.RELEASE_ON_DEVICE and "--infer" not in cmd
    run(cmd, None)
    ev = events(log)
    # built on the GPU with cuDNN's benchmark mode; the default device off once timing starts
    assert ev[:3] == [["reset_peak_memory_stats"], ["set_default_device", "cuda"],
                      ["built", "cuda", True]]
    assert ev[3] == ["set_default_device", None]
    # every clock read waits for the GPU: 2 reads around each of the 4 calls
    timed = ev[4:]
    assert [e[0] for e in timed] == ["synchronize", "iteration", "synchronize"] * 4
    assert all(e[1] is None for e in timed if e[0] == "iteration")
    r = json.loads(out.read_text())
    assert r["median_s"] == 0.25 and r["device"] == "cuda" and r["device_name"] == "Fake GPU"
    assert r["precision"] == precision and r["cudnn_benchmark"] is True
    assert (r["matmul_tf32"], r["conv_tf32"]) == ((True, True) if precision == "tf32"
                                                  else (False, True))
    assert (r["peak_allocated_bytes"], r["peak_reserved_bytes"]) == (123, 456)


def test_release_device_and_precision_are_checked(tmp_path):
    release, python, _ = fake_release(tmp_path)
    case = versus_release.parse_case("infer:b0:65:1:16")
    plain = versus_release.release_command("/rel", "/py", case, 3, 21, "/o.json")
    assert plain[1] == "/rel/bench_release.py"  # no device: the script as it is
    kw = dict(rounds=1, steps=1, warmup=0, num_classes=21,
              config=os.path.join(ROOT, "configs", "pascal.py"))
    with pytest.raises(ValueError, match="--release_precision=tf32 needs --release_device"):
        versus_release.run(str(release), python, [case], release_precision="tf32", **kw)
    with pytest.raises(ValueError, match="--release_precision='bf16'"):
        versus_release.run(str(release), python, [case], release_device="cuda",
                           release_precision="bf16", **kw)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "release_cuda.py"),
                           "--bench", str(release / "bench_release.py"), "--device", "cpu",
                           "--precision", "tf32"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(tmp_path / "faketorch"),
                               "FAKE_TORCH_LOG": str(tmp_path / "log")})
    assert proc.returncode and "TensorFloat-32 exists on CUDA devices only" in proc.stderr


# ------------------------------------------------------------------ the GPU run, dry on the CPU


def test_gpu_run_script_dry_run_on_cpu(tmp_path):
    release, python, log = fake_release(tmp_path)
    out = tmp_path / "out"
    env = subprocess_env()
    env.update(OUT=str(out), PYTHON=sys.executable, ALLSPARK_GPU_CACHE=str(tmp_path / "cache"))
    small = small_reference(tmp_path)
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "benchmarks", "gpu", "run.sh"), "--scale=tiny",
         "--release_device=cuda", f"--release_python={python}", f"--release_dir={release}",
         "--verify_files", small, small, "--steps=1", "--warmup=0",
         "--only=b5_train_bf16,b5_infer_f32,profile"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    files = sorted(os.listdir(out))
    assert files == ["log.txt", "profile.json", "summary.json", "table.md", "verify.txt"]
    s = json.loads((out / "summary.json").read_text())
    assert s["environment"]["backend"] == "cpu" and s["environment"]["torch"].startswith("0.0-fake")
    assert set(s["matmul_peak_tflops_per_s"]) == {"bfloat16:default", "float32:default",
                                                  "float32:highest"}
    assert s["verify"]["highest"]["status"] == 0 and s["verify"]["default"]["status"] == 0
    assert s["verify"]["highest"]["lines"][0].startswith("backend cpu (cpu), precision highest")
    assert all(step["status"] == 0 for step in s["steps"]), s["steps"]
    assert set(s["cases"]) == {"b5_train_bf16", "b5_infer_f32"} and not s["skipped"]
    bf16, infer = s["cases"]["b5_train_bf16"], s["cases"]["b5_infer_f32"]
    for rec in (bf16, infer):
        assert len(rec["release_s"]) == len(rec["ours_s"]) == 2 and "errors" not in rec
        assert rec["ratio"] == pytest.approx(rec["ours_best_s"] / 0.25)
        assert rec["ours_utilisation"] > 0 and rec["release_peak_allocated_bytes"] == 123
    assert bf16["label"] == "train, MiT-B0, 65 px, 1 + 1, decoder 16, allspark"
    assert [(o["dtype"], o["precision"]) for o in bf16["ours"]] == [("bfloat16", "default")] * 2
    assert [(o["precision"], o["matmul_tf32"]) for o in bf16["release"]] == [("tf32", True)] * 2
    assert [o["precision"] for o in infer["ours"]] == ["highest"] * 2
    assert [o["precision"] for o in infer["release"]] == ["release"] * 2
    assert bf16["ours_xla_memory_bytes"] > 0 and bf16["images_per_step"] == 2
    assert s["pascal_1_16_hours"]["bf16_from_2+2"]["ours_h"] > 0
    # the release's side ran 4 times, each built on the "GPU" and timed with waits
    assert sum(e[0] == "built" and e[1] == "cuda" for e in events(log)) == 4
    profile = json.loads((out / "profile.json").read_text())
    assert profile["precision"] == "default" and profile["profile"]["ops_traced"] > 0
    table = (out / "table.md").read_text()
    assert "| train, MiT-B0, 65 px, 1 + 1, decoder 16, allspark | tf32 | bfloat16 default |" in table
    assert "Pascal 1/16" in (out / "log.txt").read_text()
    # with no time left every step is skipped and said so
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu", "run.py"),
                           f"--out={tmp_path / 'none'}", "--budget_s=1", "--scale=tiny"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = json.loads((tmp_path / "none" / "summary.json").read_text())
    assert s["skipped"][:4] == ["environment", "matmul", "verify highest", "b5_train_f32 round 1"]
    assert not s["cases"]
