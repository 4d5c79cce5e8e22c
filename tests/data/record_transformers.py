r"""Records Hugging Face `transformers` SegFormer models and their outputs for tests/test_huggingface.py.

    /path/to/python-with-torch-and-transformers tests/data/record_transformers.py [--out tests/data]

Needs torch and transformers (NOT dependencies of allspark_jax; recorded with torch 2.13 CPU and
transformers 5.24). Writes two checkpoints in the hub layout (`save_pretrained`: `config.json` +
`model.safetensors`, the legacy key names every hub checkpoint uses):

  hf_mit_tiny/        `SegformerModel` (the MiT encoder alone, keys `encoder.*`), seed 1
  hf_segformer_tiny/  `SegformerForSemanticSegmentation` (keys `segformer.encoder.*`,
                      `decode_head.*`), seed 2, 5 named labels

Both have the real architecture at a small size: hidden sizes (16, 32, 40, 64), depths (1, 2, 1, 1),
heads (1, 2, 5, 8), sr ratios (8, 4, 2, 1), mlp ratios 4, patch sizes (7, 3, 3, 3), strides
(4, 2, 2, 2), decoder hidden size 32. Every tensor is moved away from its initialisation with a fixed
seed (weights redrawn at 1 / sqrt(fan_in), biases, LayerNorm and BatchNorm affines, BatchNorm running
statistics and `num_batches_tracked`), then the models are put in eval mode and run with the eager
attention (the plain matmul-softmax-matmul) in float32.

Each folder's `outputs.npz` (PyTorch layouts, NCHW, float32):
  x_square (2, 3, 65, 65), x_rect (1, 3, 65, 97)        the inputs
  {case}_stage{1..4}                                    encoder stage outputs (hidden_states)
  {case}_logits (B, 5, h/4, w/4)                        segmentation logits as transformers returns them
  {case}_upsampled (B, 5, H, W)                         those logits through F.interpolate(size=(H, W),
                                                        mode="bilinear", align_corners=False)
  meta_json                                             versions, seeds, config
with case in (square, rect).

`--check-export DIR` instead loads a checkpoint that
allspark_jax.weights.huggingface.save_checkpoint wrote (from the JAX side) with `from_pretrained`,
fails on any missing / unexpected / mismatched key, runs it on the recorded inputs of the matching
folder and prints the worst relative error per output.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerModel

ARCH = dict(hidden_sizes=[16, 32, 40, 64], depths=[1, 2, 1, 1], num_attention_heads=[1, 2, 5, 8],
            sr_ratios=[8, 4, 2, 1], mlp_ratios=[4, 4, 4, 4], patch_sizes=[7, 3, 3, 3],
            strides=[4, 2, 2, 2], decoder_hidden_size=32)
LABELS = ["background", "road", "person", "car", "sky"]
INPUT_SEED = 0
MODELS = {"hf_mit_tiny": (SegformerModel, 1), "hf_segformer_tiny": (SegformerForSemanticSegmentation, 2)}


def config() -> SegformerConfig:
    return SegformerConfig(**ARCH, id2label=dict(enumerate(LABELS)),
                           label2id={n: i for i, n in enumerate(LABELS)})


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int) -> None:
    """Moves every parameter and buffer away from its initialisation (deterministic in `seed`)."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype)  # noqa: E731
    for name, t in sorted(model.named_parameters()):
        leaf = name.rsplit(".", 1)[-1]
        if t.ndim == 1 and leaf == "weight":      # LayerNorm / BatchNorm scale
            t.copy_(1.0 + 0.2 * randn(t))
        elif t.ndim == 1:                          # biases
            t.copy_(0.1 * randn(t))
        else:                                      # Linear / Conv kernels: unit gain
            t.copy_(randn(t) / math.sqrt(t[0].numel()))
    for name, t in sorted(model.named_buffers()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "running_mean":
            t.copy_(0.1 * randn(t))
        elif leaf == "running_var":
            t.copy_(torch.rand(t.shape, generator=g) * 1.5 + 0.5)
        elif leaf == "num_batches_tracked":
            t.fill_(1234)
        else:
            raise ValueError(f"unexpected buffer {name}")


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(INPUT_SEED)
    return {"square": torch.randn(2, 3, 65, 65, generator=g),
            "rect": torch.randn(1, 3, 65, 97, generator=g)}


@torch.no_grad()
def run(model: torch.nn.Module, xs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    out = {}
    for case, x in xs.items():
        out[f"x_{case}"] = x.numpy()
        if isinstance(model, SegformerForSemanticSegmentation):
            res = model(pixel_values=x, output_hidden_states=True)
            out[f"{case}_logits"] = res.logits.numpy()
            out[f"{case}_upsampled"] = F.interpolate(res.logits, size=x.shape[2:], mode="bilinear",
                                                     align_corners=False).numpy()
        else:
            res = model(pixel_values=x, output_hidden_states=True)
        assert len(res.hidden_states) == 4, len(res.hidden_states)
        for s, h in enumerate(res.hidden_states):
            out[f"{case}_stage{s + 1}"] = h.numpy()
    return out


def record(out_dir: str) -> None:
    xs = inputs()
    for folder, (cls, seed) in MODELS.items():
        torch.manual_seed(seed)
        model = cls(config()).eval()
        perturb(model, seed)
        model.config._attn_implementation = "eager"
        path = os.path.join(out_dir, folder)
        model.save_pretrained(path, safe_serialization=True)
        arrays = run(model, xs)
        meta = {"torch": torch.__version__, "transformers": transformers.__version__,
                "class": cls.__name__, "seed": seed, "input_seed": INPUT_SEED,
                "attn_implementation": "eager", "config": model.config.to_dict()}
        arrays["meta_json"] = np.array(json.dumps(meta, sort_keys=True, default=str))
        np.savez_compressed(os.path.join(path, "outputs.npz"), **arrays)
        print(f"{path}: {sorted(os.listdir(path))}")


def check_export(path: str, reference_npz: str) -> int:
    """Loads `path` with transformers, strictly, and compares it with `reference_npz`."""
    with open(os.path.join(path, "config.json")) as f:
        arch = json.load(f)["architectures"][0]
    cls = {"SegformerModel": SegformerModel,
           "SegformerForSemanticSegmentation": SegformerForSemanticSegmentation}[arch]
    model, info = cls.from_pretrained(path, output_loading_info=True, attn_implementation="eager")
    problems = {k: v for k, v in info.items() if v}
    if problems:
        print(f"FAIL loading {path}: {problems}")
        return 1
    model.eval()
    ref = np.load(reference_npz)
    xs = {case: torch.from_numpy(ref[f"x_{case}"]) for case in ("square", "rect")}
    got, worst = run(model, xs), 0.0
    for k, v in sorted(got.items()):
        if k.startswith("x_"):
            continue
        rel = float(np.linalg.norm(v - ref[k]) / np.linalg.norm(ref[k]))
        worst = max(worst, rel)
        print(f"{k:<20} rel {rel:.2e}")
    print(f"worst {worst:.2e}")
    return 0 if worst <= 2e-6 else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--check-export", metavar="DIR")
    parser.add_argument("--reference", metavar="NPZ", help="outputs.npz to compare --check-export with")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.check_export:
        return check_export(args.check_export, args.reference)
    record(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
