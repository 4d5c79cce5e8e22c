"""Side-by-side timing against the authors' PyTorch release: the ratio table.

    python -m allspark_jax.benchmark.versus_release --release_dir=/path/to/release \
        --release_python=/path/to/venv-with-torch/bin/python --rounds=2 --json=versus.json

`--release_dir` is a folder holding the release's `bench_release.py` (it times one iteration of the
release's trainer, or with `--infer` its evaluation forward, and writes the median as JSON);
`--release_python` a Python that has torch (this process never imports it). By default the release's
script runs as it is, on the CPU; `--release_device=cuda` runs it through `benchmarks/release_cuda.py`
(its model and inputs on the GPU, a clock that waits for the GPU, cuDNN benchmark mode as the
release's trainers set it; `--release_precision` `release`: torch's defaults, `tf32`: TensorFloat-32
matrix products too). For every case the two
sides are measured alternately, release, ours, release, ours (`--rounds` pairs), each measurement in
a fresh process: the release's script, and ours as `python -m allspark_jax.benchmark --what=train`
(or `infer`) with the case's model, crop, batch, decoder width and method set on the config. A
measurement reports the median of `--steps` timed calls after one untimed call (the release's script
always runs one untimed call; ours runs `--warmup` after compiling). Each side's figure is the lower
of its per-round medians (the host's speed drifts between minutes; the lower median is the least
disturbed), and the ratio is ours / release.

Each measurement's figures beyond its median (images/s, compile time, XLA's memory estimate, the
device's peak memory, utilisation) go to the JSON's `order` entries.

A case is `WHAT:BACKBONE:CROP:BATCH:DECODER_DIM[:METHOD]`: WHAT `train` (a step on BATCH labeled +
BATCH unlabeled images; `supervised`: BATCH labeled) or `infer` (the eval-mode forward of BATCH
images), BACKBONE a MiT preset `b0`..`b5`, METHOD `allspark` (default), `semi` or `supervised`.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Callable

WHATS = ("train", "infer")
METHODS = ("allspark", "semi", "supervised")  # ours; the release's script names them:
RELEASE_METHOD = {"allspark": "allspark", "semi": "semi", "supervised": "sup"}
BACKBONES = ("b0", "b1", "b2", "b3", "b4", "b5")
DEFAULT_CASES = (
    "train:b0:257:2:256", "train:b0:513:1:256", "train:b5:513:1:768",
    "infer:b0:513:1:256", "infer:b5:513:1:768",
    "train:b0:257:2:256:semi", "train:b0:257:2:256:supervised",
)
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Runs bench_release.py on a torch device (--release_device); its --precision choices.
RELEASE_ON_DEVICE = os.path.join(PACKAGE_ROOT, "benchmarks", "release_cuda.py")
RELEASE_PRECISIONS = ("release", "tf32")
# The figures of a measurement kept beside its median: ours (per `what`) and the release's.
OURS_FIGURES = ("images_per_s", "images_per_step", "compile_s", "xla_memory_bytes", "device_peak_bytes",
                "host_peak_rss_bytes", "utilisation", "tflops_per_s", "flops")
RELEASE_FIGURES = ("first_s", "device", "device_name", "precision", "matmul_tf32", "conv_tf32",
                   "peak_allocated_bytes", "peak_reserved_bytes")


@dataclasses.dataclass(frozen=True)
class Case:
    what: str
    backbone: str
    crop: int
    batch: int
    decoder_dim: int
    method: str = "allspark"

    @property
    def label(self) -> str:
        images = f"{self.batch}" if self.what == "infer" or self.method == "supervised" else \
            f"{self.batch} + {self.batch}"
        return (f"{self.what}, MiT-{self.backbone.upper()}, {self.crop} px, {images}, decoder "
                f"{self.decoder_dim}, {self.method}")


def parse_case(spec: str) -> Case:
    """`WHAT:BACKBONE:CROP:BATCH:DECODER_DIM[:METHOD]` -> Case; anything else -> ValueError."""
    parts = spec.split(":")
    expected = "WHAT:BACKBONE:CROP:BATCH:DECODER_DIM[:METHOD], e.g. train:b0:257:2:256:allspark"
    if len(parts) not in (5, 6):
        raise ValueError(f"--case {spec!r}: expected {expected}")
    what, backbone, *numbers = parts[:5]
    method = parts[5] if len(parts) == 6 else "allspark"
    if what not in WHATS:
        raise ValueError(f"--case {spec!r}: WHAT must be one of {WHATS}, got {what!r}")
    if backbone not in BACKBONES:
        raise ValueError(f"--case {spec!r}: BACKBONE must be one of {BACKBONES}, got {backbone!r}")
    if method not in METHODS:
        raise ValueError(f"--case {spec!r}: METHOD must be one of {METHODS}, got {method!r}")
    try:
        crop, batch, dim = (int(n) for n in numbers)
    except ValueError:
        raise ValueError(f"--case {spec!r}: CROP, BATCH and DECODER_DIM must be integers; expected "
                         f"{expected}") from None
    if min(crop, batch, dim) < 1:
        raise ValueError(f"--case {spec!r}: CROP, BATCH and DECODER_DIM must be positive")
    return Case(what, backbone, crop, batch, dim, method)


def release_command(release_dir: str, release_python: str, case: Case, steps: int,
                    num_classes: int, out: str, device: str | None = None,
                    precision: str = "release") -> list[str]:
    """The release's `bench_release.py` for `case`, writing its JSON to `out`: as it is (on the
    CPU) when `device` is None, else through `benchmarks/release_cuda.py` on `device` at
    `precision`."""
    script = os.path.join(release_dir, "bench_release.py")
    runner = ([RELEASE_ON_DEVICE, "--bench", script, "--device", device, "--precision", precision]
              if device else [script])
    return [release_python, *runner,
            "--variant", case.backbone, "--size", str(case.crop), "--batch", str(case.batch),
            "--decoder_dim", str(case.decoder_dim), "--method", RELEASE_METHOD[case.method],
            "--num_classes", str(num_classes), "--iters", str(steps), "--json", out,
            *(["--infer"] if case.what == "infer" else [])]


def ours_command(config: str, case: Case, steps: int, warmup: int, num_classes: int, out: str,
                 extra: tuple[str, ...] = ()) -> list[str]:
    """`python -m allspark_jax.benchmark` for `case` on `config` (then `extra` flags), JSON to
    `out`."""
    return [sys.executable, "-m", "allspark_jax.benchmark", f"--config={config}",
            f"--config.method={case.method}", f"--config.model.backbone={case.backbone}",
            f"--config.data.crop_size={case.crop}", f"--config.model.decoder_dim={case.decoder_dim}",
            f"--config.data.num_classes={num_classes}", f"--per_device_batch={case.batch}",
            f"--what={case.what}", f"--steps={steps}", f"--warmup={warmup}", f"--json={out}",
            "--quiet", *extra]


def _run_json(command: Callable[[str], list[str]], side: str, case: Case, timeout: float,
              env: dict | None) -> dict:
    """Runs `command(out)` (a measurement writing its JSON to `out`); returns that JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = command(out)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                                  cwd=PACKAGE_ROOT if side == "ours" else None)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"versus_release: {side} timed out after {timeout:.0f} s on "
                               f"{case.label}: {' '.join(cmd)}") from None
        if proc.returncode or not os.path.isfile(out):
            raise RuntimeError(f"versus_release: {side} failed (exit {proc.returncode}) on "
                               f"{case.label}: {' '.join(cmd)}\n{proc.stderr[-4000:]}")
        with open(out) as f:
            return json.load(f)


def release_seconds(r: dict, case: Case, path: str = "bench_release.py") -> float:
    """The median of a `bench_release.py` JSON, after checking it measured `case`."""
    want = {"what": case.what, "variant": case.backbone, "size": case.crop, "batch": case.batch,
            "decoder_dim": case.decoder_dim, "method": RELEASE_METHOD[case.method]}
    missing = sorted((set(want) | {"median_s"}) - set(r))
    if missing:
        raise ValueError(f"{path}: its JSON lacks {missing}; expected the keys bench_release.py "
                         f"writes ({sorted(want)} and median_s)")
    wrong = {k: r[k] for k, v in want.items() if r[k] != v}
    if wrong:
        raise ValueError(f"{path}: measured {wrong}, not {case.label}")
    return float(r["median_s"])


def ours_seconds(r: dict, case: Case) -> float:
    """The median of a `python -m allspark_jax.benchmark` JSON, after checking it measured `case`."""
    got = {"backbone": r.get("backbone"), "crop": r.get("crop"), "batch": r.get("batch")}
    want = {"backbone": case.backbone, "crop": case.crop, "batch": case.batch}
    if got != want or case.what not in r:
        raise ValueError(f"allspark_jax.benchmark measured {got} ({sorted(r)}), not {case.label}"
                         + ("; on a multi-device host the batch is per device: make one device "
                            "visible" if got["batch"] != case.batch else ""))
    return float(r[case.what]["seconds"])


def figures(side: str, case: Case, r: dict) -> dict:
    """The figures of one measurement's JSON kept beside its median (those it has)."""
    if side == "release":
        return {k: r[k] for k in RELEASE_FIGURES if k in r}
    out = {k: v for k, v in r.get(case.what, {}).items() if k in OURS_FIGURES}
    for k in ("precision", "dtype", "backend", "device_kind"):
        if k in r:
            out[k] = r[k]
    if "matmul" in r:
        out["matmul_peak_tflops_per_s"] = r["matmul"]["peak_tflops_per_s"]
    return out


def compare(cases: list[Case], rounds: int, measure_release: Callable[[Case], dict],
            measure_ours: Callable[[Case], dict], log: Callable[[str], None] = print) -> dict:
    """Alternates the sides per case (release, ours, release, ours, ...: `rounds` pairs).

    `measure_*` run one measurement and return its JSON (`bench_release.py`'s, ours'). Returns
    {"cases": [...], "order": [...]}: per case the per-round medians of each side, the lower of
    each and ours / release; `order` lists every measurement (case index, side, round) as run.
    """
    if rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {rounds}")
    rows, order = [], []
    for i, case in enumerate(cases):
        times = {"release": [], "ours": []}
        for r in range(rounds):
            for side, measure in (("release", measure_release), ("ours", measure_ours)):
                start = time.time()
                result = measure(case)
                seconds = (release_seconds(result, case) if side == "release"
                           else ours_seconds(result, case))
                times[side].append(seconds)
                order.append({"case": i, "side": side, "round": r, "start": start,
                              "end": time.time(), "seconds": seconds,
                              "figures": figures(side, case, result)})
                log(f"{case.label}: {side} round {r + 1}/{rounds}: {seconds:.3f} s")
        best = {side: min(t) for side, t in times.items()}
        rows.append({**dataclasses.asdict(case), "label": case.label,
                     "release_s": times["release"], "ours_s": times["ours"],
                     "release_best_s": best["release"], "ours_best_s": best["ours"],
                     "ratio": best["ours"] / best["release"]})
    return {"cases": rows, "order": order}


def markdown_table(result: dict) -> str:
    """The ratio table: per case each side's per-round medians, the lower of each, the ratio."""
    lines = ["| case | release s (per round) | ours s (per round) | release s | ours s | "
             "ours / release |", "|---|---|---|---|---|---|"]
    for c in result["cases"]:
        fmt = lambda ts: ", ".join(f"{t:.3f}" for t in ts)  # noqa: E731
        lines.append(f"| {c['label']} | {fmt(c['release_s'])} | {fmt(c['ours_s'])} | "
                     f"{c['release_best_s']:.3f} | {c['ours_best_s']:.3f} | {c['ratio']:.2f} |")
    return "\n".join(lines)


def _commit() -> str | None:
    try:
        proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PACKAGE_ROOT,
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode:
        return None
    return proc.stdout.strip() or None


def run(release_dir: str, release_python: str, cases: list[Case], *, rounds: int, steps: int,
        warmup: int, num_classes: int, config: str, ours_args: tuple[str, ...] = (),
        timeout: float = 3600.0, release_device: str | None = None,
        release_precision: str = "release", deadline: float | None = None,
        log: Callable[[str], None] = print) -> dict:
    """The comparison of `cases` with the release in `release_dir` (run on `release_device` at
    `release_precision`; None: as it is, on the CPU); the JSON-able result.

    Each measurement may take `timeout` seconds, and none runs past `deadline` (a
    `time.monotonic()` value) when one is given.
    """
    script = os.path.join(release_dir, "bench_release.py")
    if not os.path.isfile(script):
        raise ValueError(f"--release_dir={release_dir!r}: no bench_release.py there; expected the "
                         "release's folder holding it")
    if not (os.path.isfile(release_python) and os.access(release_python, os.X_OK)):
        raise ValueError(f"--release_python={release_python!r} is not an executable file; expected "
                         "a Python with torch")
    if steps < 1 or warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {steps}, {warmup}")
    if release_precision not in RELEASE_PRECISIONS:
        raise ValueError(f"--release_precision={release_precision!r}: expected one of "
                         f"{', '.join(RELEASE_PRECISIONS)}")
    if release_precision != "release" and not release_device:
        raise ValueError(f"--release_precision={release_precision} needs --release_device (the "
                         "release's script on its own runs torch's defaults on the CPU)")
    env = dict(os.environ)
    env["PYTHONPATH"] = PACKAGE_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    versions = {}

    def limit() -> float:
        return timeout if deadline is None else max(1.0, min(timeout, deadline - time.monotonic()))

    def measure_release(case):
        r = _run_json(lambda out: release_command(release_dir, release_python, case, steps,
                                                  num_classes, out, release_device,
                                                  release_precision),
                      "release", case, limit(), None)
        versions["torch"] = r.get("torch")
        versions["release_threads"] = r.get("threads")
        return r

    def measure_ours(case):
        r = _run_json(lambda out: ours_command(config, case, steps, warmup, num_classes, out,
                                               tuple(ours_args)), "ours", case, limit(), env)
        versions["jax"] = r.get("jax")
        versions["backend"] = r.get("backend")
        return r

    result = compare(cases, rounds, measure_release, measure_ours, log)
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": _commit(), "machine": {"platform": platform.platform(),
                                             "processor": platform.processor(),
                                             "cpus": os.cpu_count()},
            "release_dir": os.path.abspath(release_dir), "release_python": release_python,
            "release_device": release_device or "cpu (the script as it is)",
            "release_precision": release_precision,
            "config": config, "ours_args": list(ours_args), "rounds": rounds, "steps": steps,
            "warmup": warmup, **versions, **result}


def main(argv) -> None:
    from absl import flags  # pylint: disable=g-import-not-at-top
    del argv
    f = flags.FLAGS
    cases = [parse_case(c) for c in f.case]
    result = run(f.release_dir, f.release_python, cases, rounds=f.rounds, steps=f.steps,
                 warmup=f.warmup, num_classes=f.num_classes, config=f.config,
                 ours_args=tuple(f.ours_args), timeout=f.timeout,
                 release_device=f.release_device, release_precision=f.release_precision,
                 log=lambda s: print(s, flush=True))
    print(markdown_table(result), flush=True)
    if f.json:
        os.makedirs(os.path.dirname(os.path.abspath(f.json)), exist_ok=True)
        with open(f.json, "w") as fh:
            json.dump(result, fh, indent=2)


def _define_flags() -> None:
    from absl import flags  # pylint: disable=g-import-not-at-top
    flags.DEFINE_string("release_dir", None, "Folder holding the release's bench_release.py.",
                        required=True)
    flags.DEFINE_string("release_python", None, "A Python with torch, to run the release.",
                        required=True)
    flags.DEFINE_multi_string("case", list(DEFAULT_CASES),
                              "WHAT:BACKBONE:CROP:BATCH:DECODER_DIM[:METHOD] (repeat the flag); "
                              "default: the cases of BENCHMARKS.md's side-by-side table.")
    flags.DEFINE_integer("rounds", 2, "Release/ours pairs per case.")
    flags.DEFINE_integer("steps", 3, "Timed calls per measurement (median).")
    flags.DEFINE_integer("warmup", 1, "Ours: untimed calls after compiling (the release's script "
                         "always makes one).")
    flags.DEFINE_integer("num_classes", 21, "Classes of both models.")
    flags.DEFINE_string("config", "pascal",
                        "Ours: the config file or shipped config; the case sets method, backbone, crop, decoder "
                        "width, classes and batch on it.")
    flags.DEFINE_multi_string("ours_args", [], "Ours: extra flags of `python -m "
                              "allspark_jax.benchmark` (e.g. --config.model.dtype=bfloat16), "
                              "applied to every case.")
    flags.DEFINE_float("timeout", 3600.0, "Seconds one measurement may take.")
    flags.DEFINE_string("release_device", None, "Run the release on this torch device (e.g. cuda) "
                        "through benchmarks/release_cuda.py; default: its script as it is, on the "
                        "CPU.")
    flags.DEFINE_enum("release_precision", "release", list(RELEASE_PRECISIONS),
                      "With --release_device: 'release' (torch's defaults, as the release's "
                      "trainers run) or 'tf32' (TensorFloat-32 matrix products too).")
    flags.DEFINE_string("json", None, "Write the result (table, per-round figures, order, date, "
                        "commit, machine) here.")


if __name__ == "__main__":
    from absl import app  # pylint: disable=g-import-not-at-top
    _define_flags()
    app.run(main)
