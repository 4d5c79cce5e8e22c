r"""Records small DINOv2 / DPT models of UniMatch V2's code and of transformers, with their outputs,
for tests/test_dinov2.py.

    /path/to/python-with-torch-and-transformers tests/data/record_dinov2.py \
        --unimatch /path/to/UniMatch-V2 [--out tests/data]

`--unimatch` is a checkout of UniMatch V2's code (its `model/` package is imported from there, never
copied). Needs torch, einops and transformers (NOT dependencies of allspark_jax; recorded with torch
2.13 CPU and transformers 5.25). float32, eval mode, CPU; no xFormers (DINOv2's MemEffAttention then
runs its plain attention).

UniMatch V2 (its `DPT` with a tiny `DinoVisionTransformer` built with the arguments its `DINOv2()`
passes: patch 14, layer scale 1.0, no registers, interpolate_offset 0.1, no antialiasing, no block
chunks; and a `DPTHead` of small `features` / `out_channels`):

  dpt_tiny.pth, dpt_tiny_swiglu.pth   the DPT models' state dicts (torch.save), keys `backbone.*`
                                      (facebookresearch's dinov2_vit*14_pretrain.pth names) and
                                      `head.*` (UniMatch V2's)
  dpt_tiny.npz                        inputs, the intermediate layers (as its DPT reads them:
                                      `get_intermediate_layers(x, layers)`, normed, class token
                                      dropped), the logits of `DPT.forward` (eval), and the
                                      complementary-dropout forward with its drawn mask:
    {model}_{case}_x (B, 3, H, W), {model}_{case}_layer{k} (B, h*w, D), {model}_{case}_logits
    (B, nclass, 14h, 14w); {model}_compdrop_x / _mask (B, D) / _logits; meta_json (configs).
  models: dpt_tiny (MLP, 518 px = 37x37 stored grid, so 70x98 and 84x84 inputs interpolate down)
  and dpt_tiny_swiglu (SwiGLU FFN as the giant's, a 56 px = 4x4 stored grid, so its inputs
  interpolate up; 56x70 has the stored 4 rows but is not square, which DINOv2 also interpolates).
  dpt_tiny_eval.npz                   UniMatch V2's own `evaluate` (supervised.py, mode 'original',
                                      multiplier 14) on dpt_tiny (the weights of dpt_tiny.pth) for
                                      images of sizes that are not multiples of 14, one at a time
                                      as its loader gives them: image{i}_x (1, 3, H, W) and
                                      image{i}_logits (1, nclass, H, W), the logits it takes the
                                      argmax of (input resized to int(H / 14 + 0.5) * 14, ..., the
                                      model, the logits resized back to (H, W)); meta_json.
                                      `evaluate` runs unchanged: `.cuda()` and `dist.all_reduce`
                                      are made no-ops, `Tensor.argmax` records its input, and the
                                      two modules that supervised.py imports but `evaluate` never
                                      calls (SemiDataset, tensorboard's SummaryWriter) are stubs.

transformers (`Dinov2Model`, eager attention, saved with `save_pretrained`: config.json +
model.safetensors in the hub's key names):

  hf_dinov2_tiny/, hf_dinov2_tiny_swiglu/   each with outputs.npz:
    {case}_x, {case}_last_hidden_state (B, 1+h*w, D), {case}_hidden_states (L+1, B, 1+h*w, D)
    (embeddings, then every layer), and for case 'masked' also {case}_bool_masked_pos (B, h*w).

Every tensor is moved away from its initialisation with a fixed seed (`perturb`).

`--check-export-unimatch FILE.pth` instead loads a DPT state dict that allspark_jax exported into the
same tiny UniMatch V2 model (strict), runs the recorded inputs and prints the worst relative error
of its logits; `--check-export-hf DIR` loads an exported transformers checkpoint with
`from_pretrained` and does the same for last_hidden_state.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys

import numpy as np
import torch

DPT_MODELS = {
    # name: (encoder kwargs, head kwargs, layers read, seed)
    "dpt_tiny": (dict(img_size=518, embed_dim=32, depth=5, num_heads=2, ffn_layer="mlp"),
                 dict(features=16, out_channels=[8, 12, 16, 24]), [0, 2, 3, 4], 11),
    "dpt_tiny_swiglu": (dict(img_size=56, embed_dim=48, depth=4, num_heads=3,
                             ffn_layer="swiglufused"),
                        dict(features=12, out_channels=[16, 16, 16, 16]), [0, 1, 2, 3], 12),
}
DPT_CASES = {"dpt_tiny": {"rect": (2, 70, 98), "square": (1, 84, 84)},
             "dpt_tiny_swiglu": {"rect": (2, 70, 98), "stored_rows": (1, 56, 70),
                                 "stored": (1, 56, 56)}}
NCLASS = 5
EVAL = ("dpt_tiny", ((61, 75), (50, 88)), 14)  # model, image sizes (H, W), first input seed
COMPDROP = ("dpt_tiny", (4, 42, 56), 13)  # model, (B, H, W), seed
HF_MODELS = {
    "hf_dinov2_tiny": (dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                            image_size=84, use_swiglu_ffn=False), 21),
    "hf_dinov2_tiny_swiglu": (dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                   image_size=84, use_swiglu_ffn=True), 22),
}
HF_CASES = {"rect": (2, 70, 98), "up": (1, 112, 98), "masked": (2, 70, 98)}
INPUT_SEED = 0


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int) -> None:
    """Moves every parameter and buffer away from its initialisation (deterministic in `seed`)."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype)  # noqa: E731
    for name, t in sorted(model.named_parameters()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("cls_token", "pos_embed", "mask_token", "position_embeddings"):
            t.copy_(0.5 * randn(t))
        elif t.ndim == 1 and leaf in ("weight", "gamma", "lambda1"):  # norm scales, layer scale
            t.copy_(1.0 + 0.2 * randn(t))
        elif t.ndim == 1:                                               # biases
            t.copy_(0.1 * randn(t))
        else:                                    # Linear / Conv / ConvTranspose kernels: unit gain
            fan_in = t[0].numel() if "resize_layers.0" not in name and "resize_layers.1" not in name \
                else t.shape[0]
            t.copy_(randn(t) / math.sqrt(fan_in))
    assert not list(model.buffers()), "unexpected buffers"


def images(shape, seed):
    g = torch.Generator().manual_seed(seed)
    b, h, w = shape
    return torch.randn((b, 3, h, w), generator=g)


def build_dpt(unimatch: str, name: str):
    """UniMatch V2's DPT with a tiny encoder and head (its modules, small sizes)."""
    sys.path.insert(0, unimatch)
    from model.backbone.dinov2 import DinoVisionTransformer
    from model.backbone.dinov2_layers import MemEffAttention, NestedTensorBlock
    from model.semseg.dpt import DPT, DPTHead
    enc, head, layers, seed = DPT_MODELS[name]
    model = DPT(encoder_size="small", nclass=NCLASS, **head)
    # What DINOv2(model_name) passes, at a tiny size.
    model.backbone = DinoVisionTransformer(
        patch_size=14, mlp_ratio=4, block_fn=functools.partial(NestedTensorBlock,
                                                               attn_class=MemEffAttention),
        init_values=1.0, block_chunks=0, num_register_tokens=0, interpolate_antialias=False,
        interpolate_offset=0.1, **enc)
    model.head = DPTHead(NCLASS, enc["embed_dim"], out_channels=head["out_channels"],
                         features=head["features"], use_bn=False)
    model.intermediate_layer_idx = {"small": layers}
    perturb(model, seed)
    return model.eval()


@torch.no_grad()
def record_unimatch(unimatch: str, out: str) -> None:
    arrays, meta = {}, {"torch": torch.__version__, "nclass": NCLASS, "models": {}}
    for name, (enc, head, layers, seed) in DPT_MODELS.items():
        model = build_dpt(unimatch, name)
        torch.save(model.state_dict(), os.path.join(out, f"{name}.pth"))
        meta["models"][name] = dict(encoder=enc, head=head, layers=layers, seed=seed)
        for case, shape in DPT_CASES[name].items():
            x = images(shape, INPUT_SEED)
            feats = model.backbone.get_intermediate_layers(x, layers)
            arrays[f"{name}_{case}_x"] = x.numpy()
            for k, f in enumerate(feats):
                arrays[f"{name}_{case}_layer{k}"] = f.numpy()
            arrays[f"{name}_{case}_logits"] = model(x).numpy()
    # The complementary-dropout branch of DPT.forward as its code runs it: `.cuda()` (called on the
    # Bernoulli draw) and torch.randperm are wrapped to record what they return.
    name, shape, seed = COMPDROP
    model = build_dpt(unimatch, name)
    torch.manual_seed(seed)
    drawn = {}

    def cuda(self, *a, **k):
        drawn["bernoulli"] = self.clone()
        return self

    randperm = torch.randperm

    def recorded_randperm(*a, **k):
        drawn["perm"] = randperm(*a, **k)
        return drawn["perm"]

    x = images(shape, INPUT_SEED + 1)
    tensor_cuda = torch.Tensor.cuda
    torch.Tensor.cuda, torch.randperm = cuda, recorded_randperm
    try:
        logits = model(x, comp_drop=True)
    finally:
        torch.Tensor.cuda, torch.randperm = tensor_cuda, randperm
    half = shape[0] // 2
    mask1 = drawn["bernoulli"] * 2.0
    mask2 = 2.0 - mask1
    kept = drawn["perm"][:int(half * 0.5)]
    mask1[kept, :], mask2[kept, :] = 1.0, 1.0
    arrays[f"{name}_compdrop_x"] = x.numpy()
    arrays[f"{name}_compdrop_mask"] = torch.cat([mask1, mask2]).numpy()
    arrays[f"{name}_compdrop_logits"] = logits.numpy()
    arrays["meta_json"] = np.array(json.dumps(meta))
    np.savez_compressed(os.path.join(out, "dpt_tiny.npz"), **arrays)


@torch.no_grad()
def record_eval(unimatch: str, out: str) -> None:
    import types
    name, sizes, seed = EVAL
    model = build_dpt(unimatch, name)
    model.load_state_dict(torch.load(os.path.join(out, f"{name}.pth")), strict=True)
    stubs = {"dataset.semi": dict(SemiDataset=None), "torch.utils.tensorboard": dict(
        SummaryWriter=None)}
    for module, attrs in stubs.items():
        if module not in sys.modules:
            sys.modules[module] = types.SimpleNamespace(**attrs)
    import supervised
    recorded = []
    argmax = torch.Tensor.argmax

    def recording_argmax(self, *a, **k):
        recorded.append(self.clone())
        return argmax(self, *a, **k)

    loader = [(images((1, h, w), seed + i), torch.zeros((1, h, w), dtype=torch.long), f"image{i}")
              for i, (h, w) in enumerate(sizes)]
    tensor_cuda, dist = torch.Tensor.cuda, supervised.dist
    torch.Tensor.cuda, torch.Tensor.argmax = lambda self, *a, **k: self, recording_argmax
    supervised.dist = types.SimpleNamespace(all_reduce=lambda *a, **k: None)
    try:
        supervised.evaluate(model, loader, "original", {"nclass": NCLASS}, multiplier=14)
    finally:
        torch.Tensor.cuda, torch.Tensor.argmax, supervised.dist = tensor_cuda, argmax, dist
    assert len(recorded) == len(sizes)
    arrays = {}
    for i, ((x, _, _), logits) in enumerate(zip(loader, recorded)):
        assert logits.shape == (1, NCLASS) + x.shape[2:], logits.shape
        arrays[f"image{i}_x"], arrays[f"image{i}_logits"] = x.numpy(), logits.numpy()
    arrays["meta_json"] = np.array(json.dumps(dict(torch=torch.__version__, model=name,
                                                   sizes=sizes, seed=seed, nclass=NCLASS)))
    np.savez_compressed(os.path.join(out, f"{name}_eval.npz"), **arrays)


def hf_model(arch: dict):
    from transformers import Dinov2Config, Dinov2Model
    config = Dinov2Config(patch_size=14, mlp_ratio=4, layerscale_value=1.0, **arch)
    config._attn_implementation = "eager"
    return Dinov2Model(config)


@torch.no_grad()
def record_transformers(out: str) -> None:
    import transformers
    for name, (arch, seed) in HF_MODELS.items():
        model = hf_model(arch)
        perturb(model, seed)
        model.eval()
        directory = os.path.join(out, name)
        model.save_pretrained(directory)
        arrays = {}
        for i, (case, shape) in enumerate(HF_CASES.items()):
            x = images(shape, INPUT_SEED + 2 + i)
            kwargs = {}
            if case == "masked":
                g = torch.Generator().manual_seed(seed)
                n = (shape[1] // 14) * (shape[2] // 14)
                kwargs["bool_masked_pos"] = torch.rand((shape[0], n), generator=g) < 0.3
                arrays[f"{case}_bool_masked_pos"] = kwargs["bool_masked_pos"].numpy()
            o = model(pixel_values=x, output_hidden_states=True, **kwargs)
            arrays[f"{case}_x"] = x.numpy()
            arrays[f"{case}_last_hidden_state"] = o.last_hidden_state.numpy()
            arrays[f"{case}_hidden_states"] = torch.stack(o.hidden_states).numpy()
            assert len(o.hidden_states) == arch["num_hidden_layers"] + 1
        arrays["meta_json"] = np.array(json.dumps(dict(torch=torch.__version__,
                                                       transformers=transformers.__version__,
                                                       seed=seed, arch=arch)))
        np.savez_compressed(os.path.join(directory, "outputs.npz"), **arrays)


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@torch.no_grad()
def check_export_unimatch(unimatch: str, path: str, out: str) -> None:
    name = os.path.basename(path).split(".")[0]
    name = name if name in DPT_MODELS else "dpt_tiny"
    model = build_dpt(unimatch, name)
    model.load_state_dict(torch.load(path), strict=True)
    data = np.load(os.path.join(out, "dpt_tiny.npz"))
    for case in DPT_CASES[name]:
        logits = model(torch.from_numpy(data[f"{name}_{case}_x"])).numpy()
        print(f"{name} {case}: logits rel err {rel(logits, data[f'{name}_{case}_logits']):.2e}")


@torch.no_grad()
def check_export_hf(directory: str, out: str) -> None:
    from transformers import Dinov2Model
    model, info = Dinov2Model.from_pretrained(directory, attn_implementation="eager",
                                              output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    if bad:
        raise SystemExit(f"{directory} does not load strictly: {bad}")
    model.eval()
    arch = {k: getattr(model.config, k) for k in ("hidden_size", "use_swiglu_ffn")}
    name = "hf_dinov2_tiny_swiglu" if arch["use_swiglu_ffn"] else "hf_dinov2_tiny"
    data = np.load(os.path.join(out, name, "outputs.npz"))
    for case in HF_CASES:
        kwargs = {}
        if f"{case}_bool_masked_pos" in data:
            kwargs["bool_masked_pos"] = torch.from_numpy(data[f"{case}_bool_masked_pos"])
        o = model(pixel_values=torch.from_numpy(data[f"{case}_x"]), **kwargs)
        print(f"{name} {case}: last_hidden_state rel err "
              f"{rel(o.last_hidden_state.numpy(), data[f'{case}_last_hidden_state']):.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--unimatch", required=True, help="UniMatch V2's code (with model/)")
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--check-export-unimatch", metavar="FILE")
    parser.add_argument("--check-export-hf", metavar="DIR")
    parser.add_argument("--eval-only", action="store_true",
                        help="write only dpt_tiny_eval.npz (from the dpt_tiny.pth in --out)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.check_export_unimatch:
        check_export_unimatch(args.unimatch, args.check_export_unimatch, args.out)
    elif args.check_export_hf:
        check_export_hf(args.check_export_hf, args.out)
    elif args.eval_only:
        record_eval(args.unimatch, args.out)
    else:
        record_unimatch(args.unimatch, args.out)
        record_eval(args.unimatch, args.out)
        record_transformers(args.out)


if __name__ == "__main__":
    main()
