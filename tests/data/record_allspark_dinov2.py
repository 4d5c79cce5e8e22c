#!/usr/bin/env python
r"""Records reference numbers for AllSpark on DINOv2 into allspark_dinov2_tiny.npz.

    /path/to/python-with-torch tests/data/record_allspark_dinov2.py \
        --release /path/to/release --unimatch /path/to/UniMatch-V2 [--out tests/data/allspark_dinov2_tiny.npz]

Needs PyTorch (CPU, float32), einops and numpy. `--release` is the folder of record_baselines.py
(`allspark_release/`, the release xmed-lab/AllSpark at commit 9da63e2 unchanged, and `shim/`);
`--unimatch` is UniMatch V2's code (LiheYoung/UniMatch-V2 at f6afb4d, with its `model/` package).
Both hold a top-level package named `model`: UniMatch V2's modules are imported first, the `model`
package is then dropped from sys.modules and the release's imported. Nothing of either is copied
here; their modules run as they are.

The model (`AllSparkDINOv2` below) composes, without code of its own beyond the wiring:
  backbone  UniMatch V2's `DinoVisionTransformer` as its `DINOv2()` builds it (patch 14, layer scale
            1.0, no registers, interpolate_offset 0.1, no antialiasing, no block chunks, plain
            attention: no xFormers), tiny; its stored position grid differs from the crop's token
            grid, so the embeddings are interpolated;
  allspark  the release's `model.semseg.allspark.AllSpark` with channels D (embedding_channels =
            channel_num = channel_num_out = D), Semantic Memory length patch_num = h * w (the
            crop's token grid), attention dropout 0;
  head      UniMatch V2's `DPTHead` (use_bn False), small features / out_channels.
The forward is UniMatch V2's `DPT.forward` without complementary dropout, with AllSpark where the
release puts it relative to its head (on the deepest map the head reads, SemiDecoder.forward):
`get_intermediate_layers(x, layers)` (final-normed, class token dropped, (B, h*w, D)); the LAST
of the four reshaped to (B, D, h, w), through AllSpark (with the release's pseudo-label state:
`pseudo_prob_map`, `using_SMem`) and back to (B, h*w, D); `DPTHead` on the four; the logits resized
to (14 h, 14 w), bilinear, align_corners=True. State-dict keys: `backbone.*` (facebookresearch's
names), `allspark.*` (the AllSpark module's own), `head.*` (UniMatch V2's). The `semi` baseline runs
the same model without AllSpark (`backbone.*`, `head.*` of the same state0).

Every tensor is moved off its initialisation from a fixed seed: the encoder's and head's parameters
with record_dinov2.py's `perturb` (unit-gain kernels, norm scales 1 + 0.2 N, biases 0.1 N, tokens
0.5 N); AllSpark's as record_baselines.py does (1-D + 0.05 N, others + 0.02 N), its memory
`attn.kv_queue` replaced by N(0, 1) and its write pointers `attn.queue_ptr` drawn in [0, D).

Keys (PyTorch layouts, NCHW), in the layout of allspark_tiny.npz / baselines_tiny.npz:
  meta_json                       architecture (encoder 'dinov2', backbone: DINOv2Config fields,
                                  dpt: DPTConfig fields, num_classes, allspark_heads, image_size,
                                  batch) + optimiser + protocol
  state0/<name>                   full state dict before anything ran
  inputs/x_l, x_u                 (B, 3, S, S) images; inputs/mask_l (B, S, S), rows 0-4 = 255
  eval_single/logits              (B, K, S, S) eval mode, each image of x_l on its own
  train_forward_nomem/teacher_logits, /logits, /after/allspark.attn.{kv_queue,queue_ptr}
  train_forward_mem/...           the same with the memory read (epoch >= warmup)
  train_step/lrs (3, 2), loss_x{t}, loss_u{t}, pseudo_label{t} (t = 0, 1, 2), state1/<name>,
  train_step/state3/<name>        train_allspark.py's loop body, memory read (epoch >= warmup)
  semi_step/lrs, loss_x{t}, loss_u{t}, pseudo_label{t}, state3/<name>
                                  train_baseline_semi.py's loop body, the model without AllSpark
  (state{t} is the state dict after step t - 1: in full for the t of STATES_KEPT, else only the
  Semantic Memory allspark.attn.{kv_queue,queue_ptr} (train_step/state2); no gradients: they would
  take the file past 1 MiB)
Protocol (both sequences, as allspark_tiny.npz): start from state0; step 1 on both batches flipped
left-right (images and mask), steps 0 and 2 as given; CE (ignore 255) for loss_x and loss_u (every
unlabeled pixel), loss = (loss_x + loss_u) / 2; SGD momentum 0.9, weight decay 1e-4, `backbone.*`
at lr, every other parameter at lr * lr_multi; after step i the poly rate lr (1 - i / total_iters)^0.9.
The encoder's `mask_token` takes no part in the forward: its gradient is None and torch's SGD leaves
it untouched (no weight decay either).
"""
import argparse
import copy
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 20241205
STEPS = 3
FLIPPED_STEPS = (1,)
# The full states kept after the steps (t = 1..STEPS): the first update on its own and the end of
# each sequence. Every state is ~90 KiB here (143 small arrays), so keeping all six and step 0's
# gradients would take the file past 1 MiB; the losses of steps 1 and 2 are computed from the
# states not kept, which they check indirectly. Of the others only the Semantic Memory is kept (a
# few hundred floats): which memory rows the next step writes is checked against it.
STATES_KEPT = {"train_step": (1, 3), "semi_step": (3,)}
LR, LR_MULTI, TOTAL_ITERS, MOMENTUM, WEIGHT_DECAY = 0.01, 10.0, 10, 0.9, 1e-4
IGNORE = 255
NUM_CLASSES = 3
ALLSPARK_HEADS = 2
BATCH = 2
# 42 px = a 3 x 3 token grid (n = 9); the stored position grid is 2 x 2 (28 px), so the embeddings
# are interpolated up (facebookresearch's scale factors (3 + 0.1) / 2).
IMAGE_SIZE = 42
BACKBONE = dict(embed_dim=8, depth=4, num_heads=2, mlp_ratio=4.0, ffn="mlp", patch_size=14,
                pos_grid=2, qkv_bias=True, layer_scale_init=1.0, norm_eps=1e-6,
                pos_interpolation="dinov2", interpolate_offset=0.1)
DPT = dict(features=4, out_channels=[4, 4, 8, 8], layers=[0, 1, 2, 3])


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--release", required=True, help="folder holding allspark_release/ and shim/")
    p.add_argument("--unimatch", required=True, help="UniMatch V2's code (with model/)")
    p.add_argument("--out", default=os.path.join(HERE, "allspark_dinov2_tiny.npz"))
    return p.parse_args()


def import_modules(release: str, unimatch: str):
    """(DinoVisionTransformer, NestedTensorBlock, MemEffAttention, DPTHead, AllSpark): UniMatch V2's
    then the release's, each from its own top-level `model` package."""
    sys.path.insert(0, unimatch)
    from model.backbone.dinov2 import DinoVisionTransformer
    from model.backbone.dinov2_layers import MemEffAttention, NestedTensorBlock
    from model.semseg.dpt import DPTHead
    sys.path.remove(unimatch)
    for name in [n for n in sys.modules if n == "model" or n.startswith("model.")]:
        del sys.modules[name]
    sys.path.insert(0, os.path.join(release, "shim"))
    sys.path.insert(0, os.path.join(release, "allspark_release"))
    from model.semseg.allspark import AllSpark
    return DinoVisionTransformer, NestedTensorBlock, MemEffAttention, DPTHead, AllSpark


def build(modules, with_allspark: bool):
    import functools
    import torch.nn.functional as F
    from torch import nn
    DinoVisionTransformer, NestedTensorBlock, MemEffAttention, DPTHead, AllSpark = modules
    enc = BACKBONE
    grid = IMAGE_SIZE // enc["patch_size"]

    class AllSparkDINOv2(nn.Module):
        def __init__(self):
            super().__init__()
            # What UniMatch V2's DINOv2(model_name) passes, at a tiny size.
            self.backbone = DinoVisionTransformer(
                img_size=enc["pos_grid"] * enc["patch_size"], patch_size=enc["patch_size"],
                embed_dim=enc["embed_dim"], depth=enc["depth"], num_heads=enc["num_heads"],
                mlp_ratio=enc["mlp_ratio"], qkv_bias=enc["qkv_bias"], ffn_layer=enc["ffn"],
                block_fn=functools.partial(NestedTensorBlock, attn_class=MemEffAttention),
                init_values=enc["layer_scale_init"], block_chunks=0, num_register_tokens=0,
                interpolate_antialias=False, interpolate_offset=enc["interpolate_offset"])
            # As SemiDecoder builds it, on the encoder's width; attention dropout 0 (the release
            # hard-wires 0.1) so that training-mode outputs are deterministic.
            self.allspark = AllSpark(
                num_heads=ALLSPARK_HEADS, embedding_channels=enc["embed_dim"],
                channel_num=enc["embed_dim"], channel_num_out=enc["embed_dim"],
                attention_dropout_rate=0.0, num_class=NUM_CLASSES,
                patch_num=grid * grid) if with_allspark else None
            self.head = DPTHead(NUM_CLASSES, enc["embed_dim"], features=DPT["features"],
                                use_bn=False, out_channels=DPT["out_channels"])
            # The trainer's hooks on SemiDecoder (set_pseudo_prob_map / set_SMem_status).
            self.pseudo_label = None
            self.pseudo_prob_map = None
            self.using_SMem = False

        def forward(self, x):
            patch_h, patch_w = x.shape[-2] // 14, x.shape[-1] // 14
            feats = list(self.backbone.get_intermediate_layers(x, DPT["layers"]))
            if self.allspark is not None:
                f = feats[3]
                f = f.permute(0, 2, 1).reshape(f.shape[0], f.shape[-1], patch_h, patch_w)
                f = self.allspark(f, self.pseudo_label, self.pseudo_prob_map, self.using_SMem)
                feats[3] = f.flatten(2).transpose(1, 2)
            out = self.head(feats, patch_h, patch_w)
            return F.interpolate(out, (patch_h * 14, patch_w * 14), mode="bilinear",
                                 align_corners=True)

    model = AllSparkDINOv2()
    assert not [m for m in model.modules() if isinstance(m, (nn.Dropout, nn.Dropout2d))
                and m.p != 0.0]
    return model


def perturb(model, seed: int) -> None:
    """Every tensor off its initialisation (module docstring), deterministic in `seed`."""
    import torch
    sys.path.insert(0, HERE)
    from record_dinov2 import perturb as perturb_dinov2
    perturb_dinov2(model.backbone, seed)
    perturb_dinov2(model.head, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, t in model.allspark.state_dict().items():
            if name == "attn.queue_ptr":
                t.copy_(torch.randint(0, BACKBONE["embed_dim"], t.shape, generator=g))
            elif name == "attn.kv_queue":
                t.copy_(torch.randn(t.shape, generator=g))
            elif t.ndim == 1:
                t.add_(0.05 * torch.randn(t.shape, generator=g))
            else:
                t.add_(0.02 * torch.randn(t.shape, generator=g))


def main():
    args = parse_args()
    import torch
    from torch import nn
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    modules = import_modules(args.release, args.unimatch)

    model = build(modules, with_allspark=True)
    perturb(model, SEED)
    state0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    baseline = build(modules, with_allspark=False)
    baseline.load_state_dict({k: v for k, v in state0.items() if not k.startswith("allspark.")})

    g = torch.Generator().manual_seed(SEED + 3)
    shape = (BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)
    x_l, x_u = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    mask_l = torch.randint(0, NUM_CLASSES, (BATCH, IMAGE_SIZE, IMAGE_SIZE), generator=g)
    mask_l[:, :5] = IGNORE
    out = {"state0/" + k: v.numpy() for k, v in state0.items()}
    out.update({"inputs/x_l": x_l.numpy(), "inputs/x_u": x_u.numpy(),
                "inputs/mask_l": mask_l.numpy()})

    # The release's evaluation: eval mode, no gradients, one image per call, memory not read.
    model.eval()
    model.using_SMem = False
    with torch.no_grad():
        out["eval_single/logits"] = torch.cat(
            [model(x_l[i:i + 1]) for i in range(BATCH)]).numpy()

    def fresh(m0, with_opt=True):
        m = copy.deepcopy(m0)
        m.load_state_dict({k: v for k, v in state0.items() if k in m.state_dict()})
        if not with_opt:
            return m, None
        opt = torch.optim.SGD(
            [{"params": m.backbone.parameters(), "lr": LR},
             {"params": [p for n, p in m.named_parameters() if "backbone" not in n],
              "lr": LR * LR_MULTI}],
            lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        m = nn.SyncBatchNorm.convert_sync_batchnorm(m)  # as the trainers; no BN here anyway
        return m, opt

    def teacher(m, img_u):
        """Step 1 of the iteration: eval mode, no gradients; sets the decoder's pseudo state."""
        with torch.no_grad():
            m.eval()
            pred_u_pseudo = m(img_u).detach()
            m.pseudo_prob_map = pred_u_pseudo
            pseudo_label = pred_u_pseudo.argmax(dim=1)
            m.pseudo_label = pseudo_label
        return pred_u_pseudo, pseudo_label

    memory_keys = ("allspark.attn.kv_queue", "allspark.attn.queue_ptr")
    for name, use_memory in (("train_forward_nomem", False), ("train_forward_mem", True)):
        m, _ = fresh(model, with_opt=False)
        m.using_SMem = use_memory  # set_SMem_status(epoch, isVal=False)
        pred_u, _ = teacher(m, x_u)
        m.train()
        with torch.no_grad():
            logits = m(torch.cat((x_l, x_u)))
        out[f"{name}/teacher_logits"] = pred_u.numpy()
        out[f"{name}/logits"] = logits.numpy()
        sd = m.state_dict()
        for k in memory_keys:
            out[f"{name}/after/{k}"] = sd[k].clone().numpy()

    def batch(i):
        f = (lambda a: torch.flip(a, dims=[-1])) if i in FLIPPED_STEPS else (lambda a: a)
        return f(x_l).contiguous(), f(mask_l).contiguous(), f(x_u).contiguous()

    def poly(opt, i):
        lr = LR * (1 - i / TOTAL_ITERS) ** 0.9
        opt.param_groups[0]["lr"] = lr
        opt.param_groups[1]["lr"] = lr * LR_MULTI

    # train_allspark.py (epoch >= warmup: the memory read) and train_baseline_semi.py share the
    # loop body; only the decoder hooks differ (the baseline's SemiDecoder has none).
    for prefix, m0 in (("train_step", model), ("semi_step", baseline)):
        m, opt = fresh(m0)
        m.using_SMem = True
        criterion_l = nn.CrossEntropyLoss(ignore_index=IGNORE)
        criterion_u = nn.CrossEntropyLoss(ignore_index=IGNORE)
        lrs = []
        for i in range(STEPS):
            img_x, mask_x, img_u_s = batch(i)
            _, pseudo_label = teacher(m, img_u_s)
            m.train()
            num_lb, num_ulb = img_x.shape[0], img_u_s.shape[0]
            preds = m(torch.cat((img_x, img_u_s)))
            pred_x, pred_u = preds.split([num_lb, num_ulb])
            loss_x = criterion_l(pred_x, mask_x)
            loss_u = criterion_u(pred_u, pseudo_label)
            loss = (loss_x + loss_u) / 2.0
            opt.zero_grad()
            loss.backward()
            lrs.append([g_["lr"] for g_ in opt.param_groups])
            opt.step()
            poly(opt, i)
            out[f"{prefix}/loss_x{i}"] = loss_x.detach().numpy()
            out[f"{prefix}/loss_u{i}"] = loss_u.detach().numpy()
            out[f"{prefix}/pseudo_label{i}"] = pseudo_label.numpy()
            out.update({f"{prefix}/state{i + 1}/{k}": v.detach().clone().numpy()
                        for k, v in m.state_dict().items()
                        if i + 1 in STATES_KEPT[prefix] or k in memory_keys})
        out[f"{prefix}/lrs"] = np.array(lrs, np.float64)

    meta = dict(
        encoder="dinov2", backbone=BACKBONE, dpt=DPT, num_classes=NUM_CLASSES,
        allspark_heads=ALLSPARK_HEADS, image_size=IMAGE_SIZE, batch=BATCH,
        memory_length=(IMAGE_SIZE // BACKBONE["patch_size"]) ** 2,
        decoder="UniMatch V2 DPTHead (use_bn False), release AllSpark on the last layer read",
        allspark=True, methods={"allspark": "train_allspark.py (train_step/*)",
                                "semi": "train_baseline_semi.py without AllSpark (semi_step/*)"},
        lr=LR, lr_multi=LR_MULTI, total_iters=TOTAL_ITERS, momentum=MOMENTUM,
        weight_decay=WEIGHT_DECAY, poly_power=0.9, steps=STEPS, flipped_steps=list(FLIPPED_STEPS),
        criterion={"name": "CELoss", "ignore_index": IGNORE}, loss="(loss_x + loss_u) / 2",
        dropout=0.0, drop_path=0.0, seed=SEED, release_commit="9da63e2",
        unimatch_v2_commit="f6afb4d", torch=torch.__version__)
    out["meta_json"] = np.array(json.dumps(meta))

    np.savez_compressed(args.out, **out)
    print(f"{args.out}: {len(out)} arrays, {os.path.getsize(args.out) / 2**10:.0f} KiB")
    for t in range(STEPS):
        print(f"step {t}: allspark loss_x {out[f'train_step/loss_x{t}']:.6f} "
              f"loss_u {out[f'train_step/loss_u{t}']:.6f}  semi loss_x "
              f"{out[f'semi_step/loss_x{t}']:.6f} loss_u {out[f'semi_step/loss_u{t}']:.6f}")


if __name__ == "__main__":
    main()
