#!/usr/bin/env python
"""Records reference numbers for the release's two baselines into baselines_tiny.npz.

    python tests/data/record_baselines.py --release /path/to/release --out tests/data/baselines_tiny.npz

Needs PyTorch (CPU, float32), einops and numpy, and a checkout of the authors' release
(xmed-lab/AllSpark at commit 9da63e2): `--release` is a folder holding `allspark_release/` (the
release's files, unchanged) and `shim/` (stand-ins for mmcv's ConvModule -- conv without bias,
BatchNorm2d named `bn`, ReLU -- and timm's DropPath / to_2tuple / trunc_normal_). Nothing of the
release is copied here; its modules are imported at record time and run as they are.

The model is the release's `model_helper.ModelBuilder` with `model.backbone.mit.MixVisionTransformer`
and `model.semseg.semidec_base.SemiDecoder` (the SegFormer head straight on the encoder: no AllSpark
module, no memory), with the architecture of allspark_tiny.npz (read from its `meta_json`) and every
dropout / stochastic-depth rate 0 so that training-mode outputs are deterministic. The head's
Dropout2d is hard-wired to 0.1 in semidec_base.py, so its `p` is set to 0 after construction. Every
tensor of the state dict is perturbed away from its initialisation (fixed seed), BN running
statistics included. The inputs are those of allspark_tiny.npz, copied.

Keys (PyTorch layouts, NCHW; state-dict names as the release's ModelBuilder gives them):
  meta_json                      architecture (field names as in allspark_tiny.npz) + optimiser
  state0/<name>                  full state dict before anything ran
  inputs/x_l, x_u, mask_l        copied from allspark_tiny.npz
  eval_single/logits             (B, K, H, W) inference mode, each image of x_l on its own
  semi_step/lrs                  (3, 2) [encoder, rest] learning rates used by steps 0, 1, 2
  semi_step/loss_x{t}, loss_u{t}, pseudo_label{t}     t = 0, 1, 2
  semi_step/grads0/<name>        gradient of (loss_x + loss_u)/2 at step 0, every parameter
  semi_step/state{t}/<name>      full state dict after step t-1, t = 1, 2, 3
  sup_step/lrs, sup_step/loss{t}, sup_step/grads0/<name>, sup_step/state{t}/<name>

Both step sequences start from state0 and follow allspark_tiny.npz's batch protocol: step 1 runs on
both batches flipped left-right (images and mask), steps 0 and 2 on the given batches.

semi_step replicates the loop body of train_baseline_semi.py: teacher pass with the same (online)
model in eval mode under no_grad on x_u, pseudo_label = argmax; student pass in train mode on
cat(x_l, x_u) (BN batch statistics over all 4 images); loss_x = CE(ignore 255) on the labeled part,
loss_u = CE built from cfg['criterion']['kwargs'] (not cfg['criterion_u']; as released this raises
a TypeError for Cityscapes, whose criterion is OHEM) on every unlabeled pixel, no confidence
threshold; loss = (loss_x + loss_u) / 2. No EMA teacher, no mixing, no perturbation.
sup_step replicates train_baseline_sup.py: train mode (set once per epoch), labeled batch only,
loss = CE(ignore 255). In both: SGD with the trainers' two param groups (backbone at lr, every other
parameter at lr * lr_multi), momentum 0.9, weight decay 1e-4 on every parameter; after each
optimiser step the poly rate lr * (1 - i / total_iters) ** 0.9 is set from the step's own index i,
so steps 0 and 1 both run at the base rate. The models are converted with
SyncBatchNorm.convert_sync_batchnorm after the optimiser is built, as the trainers do; in one process
that BN is plain BatchNorm. One process stands for one GPU: no DDP gradient averaging.
"""
import argparse
import copy
import json
import os
import sys
from functools import partial

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 20240611
STEPS = 3
FLIPPED_STEPS = (1,)
# allspark_tiny.npz's optimiser settings, so that the two files share a protocol.
LR, LR_MULTI, TOTAL_ITERS, MOMENTUM, WEIGHT_DECAY = 0.01, 10.0, 10, 0.9, 1e-4
IGNORE = 255


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--release", required=True,
                   help="folder holding allspark_release/ and shim/")
    p.add_argument("--tiny", default=os.path.join(HERE, "allspark_tiny.npz"),
                   help="allspark_tiny.npz: architecture and inputs are taken from it")
    p.add_argument("--out", default=os.path.join(HERE, "baselines_tiny.npz"))
    return p.parse_args()


def main():
    args = parse_args()
    sys.path.insert(0, os.path.join(args.release, "shim"))
    sys.path.insert(0, os.path.join(args.release, "allspark_release"))
    import torch
    from torch import nn
    from model.model_helper import ModelBuilder

    torch.set_num_threads(1)
    torch.manual_seed(SEED)

    with np.load(args.tiny) as tiny:
        tmeta = json.loads(str(tiny["meta_json"]))
        inputs = {k: tiny[k].copy() for k in ("inputs/x_l", "inputs/x_u", "inputs/mask_l")}
    dims = tmeta["embed_dims"]
    # The config as the release's yaml files give it (extra decoder kwargs are swallowed by
    # semidec_base.SemiDecoder's **kwargs, exactly as with the real configs).
    cfg = {
        "lr": LR, "lr_multi": LR_MULTI,
        "criterion": {"name": "CELoss", "kwargs": {"ignore_index": IGNORE}},
        "model": {
            "backbone": {"type": "model.backbone.mit.MixVisionTransformer", "kwargs": dict(
                patch_size=4, embed_dims=dims, num_heads=tmeta["num_heads"],
                mlp_ratios=tmeta["mlp_ratios"], qkv_bias=True,
                norm_layer=partial(nn.LayerNorm, eps=tmeta["layernorm_eps_blocks"]),
                depths=tmeta["depths"], sr_ratios=tmeta["sr_ratios"],
                drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0)},
            "decoder": {"type": "model.semseg.semidec_base.SemiDecoder", "kwargs": dict(
                num_heads=2, num_class=tmeta["num_classes"], in_planes=dims,
                image_size=tmeta["image_size"], embedding_dim=tmeta["decoder_dim"])},
        },
    }

    model = ModelBuilder(cfg["model"])
    # Hard-wired Dropout2d(0.1) in semidec_base.SegFormerHead; 0 keeps training mode deterministic.
    model.decoder.decoder.dropout.p = 0.0
    assert not [m for m in model.modules()
                if isinstance(m, (nn.Dropout, nn.Dropout2d)) and m.p != 0.0]

    # Move every tensor off its init (symmetric inits such as LN 1/0 or BN 0/1 would hide a
    # mapping error), from a fixed seed, in state-dict order.
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue  # num_batches_tracked stays 0
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif name.endswith("running_mean") or t.ndim == 1:
                t.add_(0.05 * torch.randn(t.shape, generator=g))
            else:
                t.add_(0.02 * torch.randn(t.shape, generator=g))
    state0 = {k: v.detach().clone() for k, v in model.state_dict().items()}

    x_l = torch.from_numpy(inputs["inputs/x_l"])
    x_u = torch.from_numpy(inputs["inputs/x_u"])
    mask_l = torch.from_numpy(inputs["inputs/mask_l"]).long()
    out = {"state0/" + k: v.numpy() for k, v in state0.items()}
    out.update(inputs)

    # The release's evaluation: eval mode, no gradients, one image per call.
    model.eval()
    with torch.no_grad():
        out["eval_single/logits"] = torch.cat(
            [model(x_l[i:i + 1]) for i in range(x_l.shape[0])]).numpy()

    def fresh():
        m = copy.deepcopy(model)
        m.load_state_dict(state0)
        opt = torch.optim.SGD(
            [{"params": m.backbone.parameters(), "lr": cfg["lr"]},
             {"params": [p for n, p in m.named_parameters() if "backbone" not in n],
              "lr": cfg["lr"] * cfg["lr_multi"]}],
            lr=cfg["lr"], momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        m = nn.SyncBatchNorm.convert_sync_batchnorm(m)
        return m, opt

    def batch(i):
        f = (lambda a: torch.flip(a, dims=[-1])) if i in FLIPPED_STEPS else (lambda a: a)
        return f(x_l).contiguous(), f(mask_l).contiguous(), f(x_u).contiguous()

    def poly(opt, i):
        lr = cfg["lr"] * (1 - i / TOTAL_ITERS) ** 0.9
        opt.param_groups[0]["lr"] = lr
        opt.param_groups[1]["lr"] = lr * cfg["lr_multi"]

    def snapshot(prefix, m):
        return {f"{prefix}/{k}": v.detach().clone().numpy() for k, v in m.state_dict().items()}

    def grads(prefix, m):
        return {f"{prefix}/{n}": p.grad.detach().clone().numpy() for n, p in m.named_parameters()}

    # train_baseline_semi.py, epoch 0, iterations 0..STEPS-1.
    m, opt = fresh()
    criterion_l = nn.CrossEntropyLoss(**cfg["criterion"]["kwargs"])
    criterion_u = nn.CrossEntropyLoss(**cfg["criterion"]["kwargs"])
    lrs = []
    for i in range(STEPS):
        img_x, mask_x, img_u_s = batch(i)
        with torch.no_grad():
            m.eval()
            pred_u_pseudo = m(img_u_s).detach()
            pseudo_label = pred_u_pseudo.argmax(dim=1)
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
        out[f"semi_step/loss_x{i}"] = loss_x.detach().numpy()
        out[f"semi_step/loss_u{i}"] = loss_u.detach().numpy()
        out[f"semi_step/pseudo_label{i}"] = pseudo_label.numpy()
        if i == 0:
            out.update(grads("semi_step/grads0", m))
        out.update(snapshot(f"semi_step/state{i + 1}", m))
    out["semi_step/lrs"] = np.array(lrs, np.float64)

    # train_baseline_sup.py, epoch 0: model.train() once per epoch, labeled batch only.
    m, opt = fresh()
    criterion = nn.CrossEntropyLoss(**cfg["criterion"]["kwargs"])
    lrs = []
    m.train()
    for i in range(STEPS):
        img, mask, _ = batch(i)
        pred = m(img)
        loss = criterion(pred, mask)
        opt.zero_grad()
        loss.backward()
        lrs.append([g_["lr"] for g_ in opt.param_groups])
        opt.step()
        poly(opt, i)
        out[f"sup_step/loss{i}"] = loss.detach().numpy()
        if i == 0:
            out.update(grads("sup_step/grads0", m))
        out.update(snapshot(f"sup_step/state{i + 1}", m))
    out["sup_step/lrs"] = np.array(lrs, np.float64)

    meta = {k: tmeta[k] for k in ("embed_dims", "depths", "num_heads", "mlp_ratios", "sr_ratios",
                                  "num_classes", "decoder_dim", "image_size", "batch")}
    meta.update(
        decoder="model.semseg.semidec_base.SemiDecoder", allspark=False,
        methods={"semi": "train_baseline_semi.py", "supervised": "train_baseline_sup.py"},
        lr=LR, lr_multi=LR_MULTI, total_iters=TOTAL_ITERS, momentum=MOMENTUM,
        weight_decay=WEIGHT_DECAY, poly_power=0.9, steps=STEPS, flipped_steps=list(FLIPPED_STEPS),
        criterion={"name": "CELoss", "ignore_index": IGNORE},
        loss_semi="(loss_x + loss_u) / 2", loss_sup="loss_x",
        dropout=0.0, drop_path=0.0, layernorm_eps_blocks=tmeta["layernorm_eps_blocks"],
        seed=SEED, release_commit="9da63e2", torch=torch.__version__)
    out["meta_json"] = np.array(json.dumps(meta))

    np.savez_compressed(args.out, **out)
    print(f"{args.out}: {len(out)} arrays, {os.path.getsize(args.out) / 2**20:.2f} MiB")
    for t in range(STEPS):
        print(f"step {t}: semi loss_x {out[f'semi_step/loss_x{t}']:.6f} "
              f"loss_u {out[f'semi_step/loss_u{t}']:.6f}  sup loss {out[f'sup_step/loss{t}']:.6f}")


if __name__ == "__main__":
    main()
