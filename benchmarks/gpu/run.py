"""The GPU run behind `benchmarks/gpu/run.sh` (which installs the carried wheels and sets the
compilation cache, then calls this): one call on a one-GPU machine, inside a deadline.

In this order, each step in its own processes under its own timeout, a step started only while the
deadline leaves it its minimum time:
  1. versions and devices (JAX's, torch's, nvidia-smi's);
  2. the matmul peaks (bfloat16; float32 at 'default' and 'highest'), for utilisation;
  3. the verifier on both reference files at 'highest' (the CPU tolerances);
  4. round 1 of the main cases, release then ours: MiT-B5 training at 2 + 2 in float32 (release:
     torch's defaults; ours: 'highest'), in bfloat16 (release: TF32 allowed), MiT-B5 inference,
     MiT-B0 training at 2 + 2;
  5. the verifier on the AllSpark file at 'default';
  6. round 2 of the main cases; then the further cases (TF32 against TF32, 8 + 8, ...), two rounds
     each; then a profile of ours (MiT-B5, 2 + 2, float32 'default').
Writes under --out: log.txt (run.sh's copy of everything printed), summary.json (every figure),
table.md (the tables), verify.txt (the verifier's output), profile.json (the profile).

`--scale tiny` runs the same steps at CPU sizes (MiT-B0, 65 px, decoder 16, batches 1 and 2) for the
test suite's dry run; `--only` limits the cases (and the profile) to those named. On a device other
than CUDA the release runs at its own precision wherever a case asks for TF32.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from allspark_jax.benchmark import versus_release  # noqa: E402  (imports no JAX)

NUM_CLASSES = 21  # Pascal VOC
PASCAL_SPLIT = "1_16"  # the paper's Pascal 1/16 run, for the hours estimate


@dataclasses.dataclass(frozen=True)
class Side:
    """One pairing: the case, the release's precision, our dtype and precision."""
    name: str
    case: str
    release_precision: str
    dtype: str
    precision: str
    min_start_s: float  # the least time left at which its first round is started


def cases(scale: str) -> tuple[list[Side], list[Side]]:
    """(main cases, further cases), most important first."""
    b5, b5dim, crop, small, large = "b5", 768, 513, 2, 8
    if scale == "tiny":
        b5, b5dim, crop, small, large = "b0", 16, 65, 1, 2  # 65: the release's memory needs it
    b0dim = 16 if scale == "tiny" else 256
    main = [
        Side("b5_train_f32", f"train:{b5}:{crop}:{small}:{b5dim}", "release", "float32", "highest", 90),
        Side("b5_train_bf16", f"train:{b5}:{crop}:{small}:{b5dim}", "tf32", "bfloat16", "default", 90),
        Side("b5_infer_f32", f"infer:{b5}:{crop}:1:{b5dim}", "release", "float32", "highest", 45),
        Side("b0_train_f32", f"train:b0:{crop}:{small}:{b0dim}", "release", "float32", "highest", 40),
    ]
    further = [
        Side("b5_train_tf32", f"train:{b5}:{crop}:{small}:{b5dim}", "tf32", "float32", "default", 90),
        Side("b5_train_f32_8", f"train:{b5}:{crop}:{large}:{b5dim}", "release", "float32", "highest", 90),
        Side("b5_train_bf16_8", f"train:{b5}:{crop}:{large}:{b5dim}", "tf32", "bfloat16", "default", 90),
        Side("b5_infer_tf32", f"infer:{b5}:{crop}:1:{b5dim}", "tf32", "float32", "default", 45),
        Side("b0_train_bf16", f"train:b0:{crop}:{small}:{b0dim}", "tf32", "bfloat16", "default", 40),
        Side("b0_infer_f32", f"infer:b0:{crop}:1:{b0dim}", "release", "float32", "highest", 30),
    ]
    return main, further


class Run:
    def __init__(self, args):
        self.args = args
        self.t0 = time.monotonic()
        self.summary = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"), "scale": args.scale, "budget_s": args.budget_s, "steps": [],
            "cases": {}, "skipped": []}
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = ROOT + os.pathsep + self.env.get("PYTHONPATH", "")

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.t0)

    def log(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f} s] {msg}", flush=True)

    def save(self) -> None:
        self.summary["elapsed_s"] = time.monotonic() - self.t0
        with open(os.path.join(self.args.out, "summary.json"), "w") as f:
            json.dump(self.summary, f, indent=2)
        with open(os.path.join(self.args.out, "table.md"), "w") as f:
            f.write(tables(self.summary) + "\n")

    def command(self, name: str, cmd: list[str], timeout: float) -> subprocess.CompletedProcess | None:
        """Runs `cmd` under min(timeout, what the deadline leaves); None when it timed out."""
        timeout = max(1.0, min(timeout, self.left()))
        start = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.env,
                                  cwd=ROOT)
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            self.summary["steps"].append({"name": name, "status": "timeout", "timeout_s": timeout,
                                          "seconds": time.monotonic() - start})
            self.log(f"{name}: timed out after {timeout:.0f} s\n{out[-2000:]}")
            return None
        self.summary["steps"].append({"name": name, "status": proc.returncode,
                                      "seconds": time.monotonic() - start})
        return proc

    # ------------------------------------------------------------------------------- the steps

    def environment(self) -> None:
        py = self.args.python
        probe = ("import json, jax, jaxlib, flax, optax; d = jax.devices(); print(json.dumps("
                 "{'jax': jax.__version__, 'jaxlib': jaxlib.__version__, 'flax': flax.__version__, "
                 "'optax': optax.__version__, 'backend': jax.default_backend(), "
                 "'devices': [str(x) for x in d], 'device_kind': d[0].device_kind}))")
        info = {}
        proc = self.command("versions: jax", [py, "-c", probe], 120)
        if proc is not None and proc.returncode == 0:
            info.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        else:
            self.log(f"jax probe failed: {proc.stderr[-2000:] if proc else 'timeout'}")
        proc = self.command("versions: torch", [self.args.release_python, "-c",
                            "import torch; print(torch.__version__, torch.cuda.is_available(), "
                            "torch.cuda.get_device_name() if torch.cuda.is_available() else '-')"],
                            60)
        info["torch"] = proc.stdout.strip() if proc is not None and proc.returncode == 0 else None
        proc = self.command("nvidia-smi", ["sh", "-c", "nvidia-smi --query-gpu=name,memory.total,"
                            "driver_version,clocks.sm,clocks.max.sm --format=csv,noheader "
                            "2>/dev/null || echo none"], 30)
        info["nvidia_smi"] = proc.stdout.strip() if proc is not None else None
        self.summary["environment"] = info
        self.log("environment: " + json.dumps(info))

    def matmul_peaks(self) -> None:
        """bfloat16, and float32 at 'default' and 'highest': each the peak its cases use."""
        n = 256 if self.args.scale == "tiny" else 8192
        code = (
            "import json, jax\n"
            "from allspark_jax.benchmark import measure\n"
            "out = {}\n"
            "for dtype, precision in (('bfloat16', 'default'), ('float32', 'default'), "
            "('float32', 'highest')):\n"
            "    with jax.default_matmul_precision(precision):\n"
            f"        r = measure.bench_matmul({n}, dtype, steps=10, warmup=2)\n"
            "    out[dtype + ':' + precision] = r['peak_tflops_per_s']\n"
            "print(json.dumps(out))\n")
        proc = self.command("matmul peaks", [self.args.python, "-c", code], 120)
        if proc is None or proc.returncode:
            self.log(f"matmul peaks failed: {proc.stderr[-2000:] if proc else 'timeout'}")
            return
        self.summary["matmul_peak_tflops_per_s"] = json.loads(proc.stdout.strip().splitlines()[-1])
        self.log(f"matmul peaks (TFLOP/s, n={n}): {self.summary['matmul_peak_tflops_per_s']}")

    def verify(self, files: list[str], precision: str, timeout: float) -> None:
        name = f"verify {precision}"
        proc = self.command(name, [self.args.python, "-m", "allspark_jax.tools.verify_reference",
                                   *files, f"--precision={precision}"], timeout)
        text = (proc.stdout + proc.stderr[-3000:]) if proc is not None else "timed out\n"
        with open(os.path.join(self.args.out, "verify.txt"), "a") as f:
            f.write(f"== {name}: {' '.join(files)}\n{text}\n")
        summary_lines = [line for line in text.splitlines() if "cases ok" in line or "FAIL" in line
                         or line.startswith("backend")]
        self.summary.setdefault("verify", {})[precision] = {
            "status": None if proc is None else proc.returncode, "lines": summary_lines}
        self.log(f"{name}: " + " | ".join(summary_lines))

    def measure(self, side: Side, round_: int) -> None:
        """One round (release, then ours) of `side`; appended to its record. A later round only
        follows a round that measured."""
        rec = self.summary["cases"].setdefault(side.name, {
            **dataclasses.asdict(side), "release_s": [], "ours_s": [], "release": [], "ours": []})
        if round_ > 1 and not rec["ours_s"]:
            self.log(f"{side.name}: round {round_} skipped, no earlier round measured")
            return
        case = versus_release.parse_case(side.case)
        deadline = time.monotonic() + self.left() - 2
        cuda = self.args.release_device.startswith("cuda")
        release_precision = side.release_precision if cuda else "release"
        try:
            r = versus_release.run(
                self.args.release_dir, self.args.release_python, [case], rounds=1,
                steps=self.args.steps, warmup=self.args.warmup, num_classes=NUM_CLASSES,
                config=os.path.join(ROOT, "configs", "pascal.py"),
                ours_args=(f"--config.model.dtype={side.dtype}",
                           f"--config.model.precision={side.precision}"),
                deadline=deadline, release_device=self.args.release_device,
                release_precision=release_precision, log=self.log)
        except (RuntimeError, ValueError) as e:
            rec.setdefault("errors", []).append(str(e)[-3000:])
            self.log(f"{side.name}: {str(e)[-3000:]}")
            return
        for o in r["order"]:
            rec[f"{o['side']}_s"].append(o["seconds"])
            rec[o["side"]].append(o["figures"])
        rec["label"] = r["cases"][0]["label"]
        rec["torch"], rec["jax"] = r.get("torch"), r.get("jax")
        finish(rec, self.summary.get("matmul_peak_tflops_per_s", {}))
        self.log(f"{side.name}: release {rec['release_s']}, ours {rec['ours_s']}, ratio "
                 f"{rec.get('ratio', float('nan')):.3f}")

    def profile(self, side: Side) -> None:
        case = versus_release.parse_case(side.case)
        out = os.path.join(self.args.out, "profile.json")
        cmd = versus_release.ours_command(
            os.path.join(ROOT, "configs", "pascal.py"), case, self.args.steps, self.args.warmup,
            NUM_CLASSES, out, (f"--config.model.dtype={side.dtype}",
                               f"--config.model.precision={side.precision}",
                               "--what=train,profile", "--profile_steps=2"))
        proc = self.command(f"profile {side.name}", cmd, self.left() - 2)
        if proc is not None and proc.returncode:
            self.log(f"profile failed: {proc.stderr[-2000:]}")

    def pascal_hours(self) -> None:
        """Hours of the paper's Pascal 1/16 run on this GPU, from the measured 8 + 8 step (else the
        2 + 2 step times 4, marked so)."""
        from allspark_jax import config as config_lib  # pylint: disable=g-import-not-at-top
        config = config_lib.load_config(os.path.join(ROOT, "configs", f"pascal.py:{PASCAL_SPLIT}"))
        split = os.path.join(ROOT, "allspark_jax", "data", "splits", "pascal", PASCAL_SPLIT,
                             "unlabeled.txt")
        with open(split) as f:
            unlabeled = sum(1 for line in f if line.strip())
        steps = unlabeled // int(config.data.batch_size) * int(config.train.epochs)
        out = {"split": PASCAL_SPLIT, "steps": steps, "global_batch": int(config.data.batch_size)}
        for name, key, factor in (("b5_train_f32_8", "f32_highest", 1), ("b5_train_bf16_8", "bf16", 1),
                                  ("b5_train_f32", "f32_highest_from_2+2", 4),
                                  ("b5_train_bf16", "bf16_from_2+2", 4)):
            rec = self.summary["cases"].get(name, {})
            if rec.get("ours_best_s"):
                out[key] = {"ours_h": steps * factor * rec["ours_best_s"] / 3600,
                            "release_h": steps * factor * rec["release_best_s"] / 3600}
        self.summary["pascal_1_16_hours"] = out


def finish(rec: dict, peaks: dict) -> None:
    """Best times, ratio, images/s and utilisation of a case record."""
    if not (rec["release_s"] and rec["ours_s"]):
        return
    rec["release_best_s"], rec["ours_best_s"] = min(rec["release_s"]), min(rec["ours_s"])
    rec["ratio"] = rec["ours_best_s"] / rec["release_best_s"]
    last = rec["ours"][-1]
    images = last["images_per_step"]
    rec["images_per_step"] = images
    rec["ours_images_per_s"] = images / rec["ours_best_s"]
    rec["release_images_per_s"] = images / rec["release_best_s"]
    peak = peaks.get(f"{rec['dtype']}:{rec['precision']}")
    flops = last.get("flops")
    if peak and flops:  # XLA's count of our program: the same model's arithmetic on both sides
        rec["ours_utilisation"] = flops / rec["ours_best_s"] / (peak * 1e12)
        rec["release_utilisation"] = flops / rec["release_best_s"] / (peak * 1e12)
    rec["ours_xla_memory_bytes"] = last.get("xla_memory_bytes")
    rec["ours_device_peak_bytes"] = max((o.get("device_peak_bytes") or 0) for o in rec["ours"])
    rec["release_peak_allocated_bytes"] = max(
        (o.get("peak_allocated_bytes") or 0) for o in rec["release"])
    rec["ours_compile_s"] = [o.get("compile_s") for o in rec["ours"]]


def tables(summary: dict) -> str:
    gib = lambda b: f"{b / 2 ** 30:.2f}" if b else "-"  # noqa: E731
    pct = lambda u: f"{100 * u:.1f}%" if u is not None else "-"  # noqa: E731
    lines = ["| case | release | ours | release s | ours s | ours / release | img/s release, "
             "ours | utilisation release, ours | memory GiB: ours XLA, ours peak, release peak |",
             "|---|---|---|---|---|---|---|---|---|"]
    for rec in summary["cases"].values():
        if "ratio" not in rec:
            lines.append(f"| {rec['name']} | {rec['release_precision']} | {rec['dtype']} "
                         f"{rec['precision']} | not measured ({len(rec.get('errors', []))} "
                         "errors) | | | | | |")
            continue
        lines.append(
            f"| {rec['label']} | {rec['release_precision']} | {rec['dtype']} {rec['precision']} | "
            f"{', '.join(f'{t:.4f}' for t in rec['release_s'])} | "
            f"{', '.join(f'{t:.4f}' for t in rec['ours_s'])} | {rec['ratio']:.2f} | "
            f"{rec['release_images_per_s']:.1f}, {rec['ours_images_per_s']:.1f} | "
            f"{pct(rec.get('release_utilisation'))}, {pct(rec.get('ours_utilisation'))} | "
            f"{gib(rec.get('ours_xla_memory_bytes'))}, {gib(rec.get('ours_device_peak_bytes'))}, "
            f"{gib(rec.get('release_peak_allocated_bytes'))} |")
    if summary.get("skipped"):
        lines.append(f"\nNot started (deadline): {', '.join(summary['skipped'])}")
    if summary.get("pascal_1_16_hours"):
        lines.append(f"\nPascal 1/16, one GPU: {json.dumps(summary['pascal_1_16_hours'])}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--budget_s", type=float, default=525.0,
                   help="seconds for everything; steps are cut to fit")
    p.add_argument("--scale", choices=("full", "tiny"), default="full")
    p.add_argument("--python", default=sys.executable, help="the Python with JAX")
    p.add_argument("--release_python", default=sys.executable, help="the Python with torch")
    p.add_argument("--release_dir", default=os.path.join(ROOT, ".release"))
    p.add_argument("--release_device", default="cuda")
    p.add_argument("--verify_files", nargs=2, default=[
        os.path.join(ROOT, "tests", "data", "allspark_tiny.npz"),
        os.path.join(ROOT, "tests", "data", "baselines_tiny.npz")],
                   metavar=("ALLSPARK_NPZ", "BASELINES_NPZ"))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--only", default=None, help="comma-separated case names (and/or 'profile') "
                   "to run; default: all")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    run = Run(args)
    main_cases, further = cases(args.scale)
    plan = [("environment", 10, run.environment), ("matmul", 20, run.matmul_peaks),
            ("verify highest", 30, lambda: run.verify(args.verify_files, "highest", 180))]
    plan += [(f"{s.name} round 1", s.min_start_s, lambda s=s: run.measure(s, 1))
             for s in main_cases]
    plan += [("verify default", 30, lambda: run.verify(args.verify_files[:1], "default", 90))]
    plan += [(f"{s.name} round 2", 30, lambda s=s: run.measure(s, 2)) for s in main_cases]
    for s in further:
        plan += [(f"{s.name} round {r}", s.min_start_s if r == 1 else 30,
                  lambda s=s, r=r: run.measure(s, r)) for r in (1, 2)]
    plan += [("profile b5_train_tf32", 60, lambda: run.profile(further[0]))]
    only = set(args.only.split(",")) if args.only else None
    for name, need, step in plan:
        if only is not None and " " in name and name.split()[0] not in only | {"verify"}:
            continue
        if run.left() < need:
            run.summary["skipped"].append(name)
            run.log(f"{name}: skipped, {run.left():.0f} s left (needs {need:.0f})")
            continue
        run.log(f"== {name}")
        step()
        run.save()
    run.pascal_hours()
    run.save()
    print(tables(run.summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
