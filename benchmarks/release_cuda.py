#!/usr/bin/env python
"""Runs the release's `bench_release.py`, unchanged, on a CUDA GPU (or another torch device).

    python benchmarks/release_cuda.py --bench .release/bench_release.py [--device cuda] \
        [--precision release|tf32] --variant b5 --size 513 --batch 2 --decoder_dim 768 --json r.json

Every flag this script does not know goes to `bench_release.py`. That script builds its model and
tensors with torch's defaults (on the CPU) and times with `time.perf_counter` without waiting for
the device. Around it, without editing it, this script:
  * makes `--device` torch's default device while the script builds its model, optimizer and
    inputs, and turns the default off again when the timed loop begins (its first read of the clock;
    the script creates nothing after that, and a default device costs every later torch call);
  * waits for the device before every read of the clock (`torch.cuda.synchronize`), so each time
    covers the device's work;
  * sets `cudnn.enabled` and `cudnn.benchmark` as the release's trainers (train_allspark.py ...) do;
  * `--precision release`: torch's defaults, as the release's trainers run (float32 matrix
    products in full float32, cuDNN convolutions allowed TensorFloat-32); `tf32`: TensorFloat-32
    allowed for matrix products too;
  * adds to the script's JSON the device, its name, the precision settings and the device's peak
    memory (torch's allocator: allocated and reserved bytes).
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time

PRECISIONS = ("release", "tf32")


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bench", required=True, help="the release's bench_release.py")
    p.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    p.add_argument("--precision", choices=PRECISIONS, default="release",
                   help="release: torch's defaults (the release's); tf32: TF32 matrix products too")
    return p.parse_known_args(argv)


def configure(torch, device: str, precision: str) -> dict:
    """Sets the default device and the backend settings; returns them for the JSON."""
    kind = torch.device(device).type
    if kind != "cuda" and precision != "release":
        raise SystemExit(f"--precision={precision}: TensorFloat-32 exists on CUDA devices only, "
                         f"not on --device={device}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device={device}: torch {torch.__version__} sees no CUDA device")
    info = {"device": device, "precision": precision}
    if kind == "cuda":
        torch.backends.cudnn.enabled = True  # as the release's trainers set them
        torch.backends.cudnn.benchmark = True
        if precision == "tf32":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats()
        info.update(device_name=torch.cuda.get_device_name(), cudnn_benchmark=True,
                    matmul_tf32=bool(torch.backends.cuda.matmul.allow_tf32),
                    conv_tf32=bool(torch.backends.cudnn.allow_tf32))
    torch.set_default_device(device)
    return info


def synchronised_clock(torch, device: str, script: str, clock=time.perf_counter):
    """A `time.perf_counter` that waits for `device` first; its first call from `script` (the
    file's path) also turns the default device off (the timed loop has begun)."""
    cuda = torch.device(device).type == "cuda"
    state = {"timing": False}

    def read() -> float:
        if not state["timing"] and sys._getframe(1).f_code.co_filename == script:  # pylint: disable=protected-access
            state["timing"] = True
            torch.set_default_device(None)
        if cuda:
            torch.cuda.synchronize()
        return clock()
    return read


def json_path(bench_args: list[str]) -> str | None:
    for i, a in enumerate(bench_args):
        if a == "--json" and i + 1 < len(bench_args):
            return bench_args[i + 1]
        if a.startswith("--json="):
            return a.split("=", 1)[1]
    return None


def main(argv: list[str]) -> None:
    args, bench_args = parse(argv)
    bench = os.path.abspath(args.bench)
    if not os.path.isfile(bench):
        raise SystemExit(f"--bench={args.bench!r}: no such file; expected the release's "
                         "bench_release.py")
    import torch  # pylint: disable=g-import-not-at-top
    info = configure(torch, args.device, args.precision)
    clock = time.perf_counter
    time.perf_counter = synchronised_clock(torch, args.device, bench, clock)
    sys.argv = [bench, *bench_args]
    try:
        runpy.run_path(bench, run_name="__main__")
    finally:
        time.perf_counter = clock
    if torch.device(args.device).type == "cuda":
        info.update(peak_allocated_bytes=int(torch.cuda.max_memory_allocated()),
                    peak_reserved_bytes=int(torch.cuda.max_memory_reserved()))
    out = json_path(bench_args)
    if out:
        with open(out) as f:
            result = json.load(f)
        result.update(info)
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
    print(f"release_cuda: {json.dumps(info)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
