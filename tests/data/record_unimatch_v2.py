#!/usr/bin/env python
r"""Records three training steps of UniMatch V2's own trainer into unimatch_v2_tiny.npz.

    /path/to/python-with-torch tests/data/record_unimatch_v2.py \
        --unimatch /path/to/UniMatch-V2 [--out tests/data/unimatch_v2_tiny.npz]

Needs PyTorch (CPU, float32), einops, numpy and pyyaml. `--unimatch` is UniMatch V2's code
(LiheYoung/UniMatch-V2 at f6afb4d: `unimatch_v2.py`, `model/`, `util/`, ...). Its trainer runs
unchanged: `unimatch_v2.main()` is called with a config written here, and only the infrastructure
around the training iteration is replaced from this script:
  - `setup_distributed` -> rank 0 of 1 (LOCAL_RANK 0); `DistributedDataParallel` -> a pass-through
    module (its state-dict keys `module.*`, dropped here); `SyncBatchNorm.convert_sync_batchnorm`
    -> identity; `Tensor.cuda` / `Module.cuda` -> no-ops; tensorboard's `SummaryWriter` -> a
    recorder of `add_scalar`; `dataset.semi` (PIL / torchvision) -> a stub;
  - `SemiDataset` / `DistributedSampler` / `DataLoader` -> loaders of LOADER_LEN batches (the
    trainer's log interval `len(trainloader_u) // 8` needs >= 8) that yield the fixed batches below
    and stop the trainer at the fetch after the last recorded step (`_Stop`, caught here), so
    `evaluate` and the checkpointing never run;
  - `DPT`'s size presets -> a tiny model: the trainer's `DPT(...)` builds UniMatch V2's `DPT` with
    small `features` / `out_channels` (DPT below), reading the blocks DPT["layers"], while its
    `model.semseg.dpt.DINOv2` builds a tiny `DinoVisionTransformer` (BACKBONE below) with the
    arguments its `DINOv2()` passes (patch 14, layer scale 1.0, no registers, interpolate_offset
    0.1, no antialiasing, no block chunks, plain attention: no xFormers);
    `torch.load('./pretrained/dinov2_small.pth')` returns the tiny encoder's state dict;
  - the complementary-dropout draws in `DPT.forward` (`self.binomial.sample((B, D))` and
    `torch.randperm(B)`) return the masks drawn here per step.
Everything else (the EMA teacher built by `deepcopy`, the CutMix with the flipped batch, the
loss, AdamW, the poly schedule, the EMA update) is the trainer's own code.

Every tensor is moved off its initialisation before the trainer builds its EMA copy (the teacher
starts as a deep copy of the student): the encoder's parameters in the state dict that the patched
`torch.load` returns, the head's in the patched construction, both with record_dinov2.py's
`perturb` (unit-gain kernels, norm scales 1 + 0.2 N, biases 0.1 N, tokens 0.5 N); the classifier
kernel (head.scratch.output_conv.2.weight) is then centred over its input channels and scaled by
LOGIT_GAIN, so that the teacher's classes vary over the pixels and some of its confidences pass
CONF_THRESH (a unit-gain head on non-negative ReLU features gives one class almost everywhere, at
low confidence). Two parts of the model take no part in the loss and so have no gradient (AdamW
then leaves them untouched, weight decay included): the encoder's `mask_token` and
`head.scratch.refinenet4.resConfUnit1` (DPTHead calls refinenet4 with one input); `meta_json`
lists them.

The batches (make_batches): images from 8-bit pixels (coloured regions plus noise) normalised with
ImageNet's mean / std as SemiDataset does, the strong views photometric changes of the weak one;
padding (pixel 0) on some rows / columns, 255 in `mask_x` and `ignore_mask` there; `mask_x` the
initial model's own classes with LABEL_NOISE of them redrawn (random masks alone drive the model to
uniform predictions within a step, and no pseudo-label would then pass the threshold); CutMix
boxes of different sizes per image, view and step, some images without one; the
complementary-dropout draws seeded.

What is recorded is read from the trainer itself: the states, the optimiser's moments, the
learning rates and the step's intermediate values from `main()`'s locals at the loader's next
fetch (before step t + 1, or at the stopping fetch after the last step), the losses from the
`add_scalar` calls, the complementary-dropout scale from `DPT.forward`'s local `dropout_mask`.

Keys (PyTorch layouts, NCHW; float32 unless said; B = BATCH images per loader, S = CROP,
K = NCLASS, D = the encoder's width; <name> = the DPT state-dict names: `backbone.*`,
facebookresearch's dinov2_vit*14_pretrain.pth names, and `head.*`, UniMatch V2's):
  meta_json                          the architecture (encoder 'dinov2', `backbone`: DINOv2Config
                                     fields, `dpt`: DPTConfig fields but num_classes, num_classes),
                                     the yaml values (lr, lr_multi, conf_thresh, nclass, crop_size,
                                     batch_size, epochs, criterion), loader_len, total_iters,
                                     steps, AdamW's betas / eps / weight decay, the parameters
                                     without a gradient (`no_grad_params`: AdamW never touches
                                     them), seed, torch version, UniMatch V2 commit
  state0/<name>                      student = EMA teacher before the first step
  step{t}/ (t = 0 .. STEPS - 1)      step t, the trainer's iteration i = t of epoch 0:
    img_x (B, 3, S, S), mask_x (B, S, S) int32 (255: padding), img_u_w, img_u_s1, img_u_s2
    (B, 3, S, S) (the strong views as the loader gives them, before CutMix), ignore_mask (B, S, S)
    int32 (255: padding, else 0), cutmix_box1, cutmix_box2 (B, S, S) float32 0/1: the batch;
    comp_drop_bernoulli (B, D) 0/1 and comp_drop_perm (B,) int32: the draws fed to DPT.forward;
    comp_drop_scale (2B, D): its `dropout_mask` (rows 0..B-1 scale the first strong view's
                                     features, B..2B-1 the second's; each of the 4 layers read);
    lr (2,) float64                  the rates step t used: [backbone.*, every other parameter];
    ema_ratio () float64             min(1 - 1/(t + 1), 0.996) of the EMA update after step t;
    teacher_logits (B, K, S, S)      `pred_u_w`: the EMA teacher (eval mode) on img_u_w;
    conf_u_w (B, S, S), pseudo_label (B, S, S) int32: its softmax max and argmax;
    pseudo_label_mixed{v}, ignore_mask_mixed{v} (v = 1, 2; (B, S, S) int32): the trainer's
                                     `mask_u_w_cutmixed{v}` / `ignore_mask_cutmixed{v}` (inside
                                     box v image i takes image B-1-i's values: the flipped batch);
    loss, loss_x, loss_s, mask_ratio () float32: `add_scalar`'s loss_all / loss_x / loss_s /
                                     mask_ratio; loss_s1, loss_s2 () the two views' losses;
    grads/<name>                     (step 0 only) the gradients of that step's loss (the
                                     parameters with one);
    after/student/<name>, after/ema/<name>: the state dicts after step t (and its EMA update);
    after/adam_exp_avg/<name>, after/adam_exp_avg_sq/<name>: AdamW's moments after step t;
    after/adam_step () float32       AdamW's step count (every parameter with a state has it).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import types

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 20241228
STEPS = 3
LOADER_LEN = 8          # batches per epoch (the trainer's `len(trainloader_u)`)
EPOCHS = 2              # total_iters = LOADER_LEN * EPOCHS
NCLASS = 4
# 42 px = a 3 x 3 token grid; the stored position grid is 2 x 2 (28 px): interpolated up.
CROP = 42
# 3 images per loader: with 2 the flipped batch (image B-1-i) would equal a roll by one, and the
# odd middle image pairs with itself.
BATCH = 3
LR, LR_MULTI = 1e-4, 10.0
CONF_THRESH = 0.9
BACKBONE = dict(embed_dim=8, depth=4, num_heads=2, mlp_ratio=4.0, ffn="mlp", patch_size=14,
                pos_grid=2, qkv_bias=True, layer_scale_init=1.0, norm_eps=1e-6,
                pos_interpolation="dinov2", interpolate_offset=0.1)
DPT = dict(features=4, out_channels=[4, 4, 8, 8], layers=[0, 1, 2, 3])
# The classifier kernel's gain after `perturb` (module docstring): with unit gain the teacher is
# below 0.6 confident on most pixels at 4 classes, and the threshold is to pass some of them.
LOGIT_GAIN = 4.0
LABEL_NOISE = 0.25  # the fraction of labeled pixels whose class is redrawn (make_batches)
UNIMATCH_V2_COMMIT = "f6afb4d"


_INHERITED = object()


class _Stop(Exception):
    """Raised by the labeled loader at the fetch after the last recorded step."""


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--unimatch", required=True, help="UniMatch V2's code (with unimatch_v2.py)")
    p.add_argument("--out", default=os.path.join(HERE, "unimatch_v2_tiny.npz"))
    return p.parse_args()


def make_batches(torch, predict):
    """STEPS batches: the labeled pair and the unlabeled 6-tuple, as SemiDataset's loaders give
    them (dtypes included: images from 8-bit pixels normalised with ImageNet's mean / std, padding
    pixels 0 where the mask is 255), with the complementary-dropout draws of each step.
    `predict(img) -> (B, S, S)`: the initial model's classes, the labeled masks' source."""
    g = torch.Generator().manual_seed(SEED + 1)
    b, s, d = BATCH, CROP, BACKBONE["embed_dim"]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def pixels():  # coloured regions (a 4 x 4 grid of them) with pixel noise
        regions = torch.nn.functional.interpolate(torch.randn((b, 3, 4, 4), generator=g), (s, s))
        noise = torch.randn((b, 3, s, s), generator=g)
        return (128 + 70 * regions + 25 * noise).round().clamp(0, 255).long()

    def strong(pix):  # a photometric change of the weak view, still 8-bit
        return (pix + torch.randint(-40, 41, pix.shape, generator=g)).clamp(0, 255)

    def normalize(pix, pad):
        pix = torch.where(pad.unsqueeze(1), 0, pix)
        return (pix.float() / 255.0 - mean) / std

    batches = []
    for t in range(STEPS):
        # Padding as the crop adds it: bottom rows / right columns, a different side per image.
        pad_x = torch.zeros((b, s, s), dtype=torch.bool)
        pad_x[0, s - 5 - t:] = True
        pad_x[1, :, s - 9:] = True
        img_x = normalize(pixels(), pad_x)
        noisy = torch.rand((b, s, s), generator=g) < LABEL_NOISE
        mask_x = torch.where(noisy, torch.randint(0, NCLASS, (b, s, s), generator=g),
                             predict(img_x))
        mask_x[pad_x] = 255
        ignore_mask = torch.zeros((b, s, s), dtype=torch.long)
        ignore_mask[(t + 1) % b, s - 7:] = 255
        ignore_mask[(t + 2) % b, :, s - 11 + t:] = 255
        pad_u = ignore_mask == 255
        pix_w = pixels()
        img_u_w = normalize(pix_w, pad_u)
        img_u_s1, img_u_s2 = normalize(strong(pix_w), pad_u), normalize(strong(pix_w), pad_u)
        boxes = []
        for v in range(2):
            box = torch.zeros((b, s, s))
            for i in range(b):
                if (i + v + t) % 4 == 3:  # no box (UniMatch V2 draws one with p = 0.5)
                    continue
                h, w = (int(x) for x in torch.randint(6, 26, (2,), generator=g))
                y0, x0 = (int(x) for x in torch.randint(0, s - 6, (2,), generator=g))
                box[i, y0:y0 + h, x0:x0 + w] = 1.0
            boxes.append(box)
        bern = torch.randint(0, 2, (b, d), generator=g).float()
        perm = torch.randperm(b, generator=g)
        batches.append(dict(img_x=img_x, mask_x=mask_x, img_u_w=img_u_w, img_u_s1=img_u_s1,
                            img_u_s2=img_u_s2, ignore_mask=ignore_mask, cutmix_box1=boxes[0],
                            cutmix_box2=boxes[1], comp_drop_bernoulli=bern, comp_drop_perm=perm))
    return batches


def write_config(directory: str) -> str:
    cfg = dict(dataset="pascal", data_root="unused", nclass=NCLASS, crop_size=CROP, epochs=EPOCHS,
               batch_size=BATCH, lr=LR, lr_multi=LR_MULTI,
               criterion=dict(name="CELoss", kwargs=dict(ignore_index=255)),
               conf_thresh=CONF_THRESH, model="dpt", backbone="dinov2_small",
               lock_backbone=False)
    import yaml
    path = os.path.join(directory, "tiny.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def strip(state: dict) -> dict:
    """State-dict keys without DistributedDataParallel's `module.` (the pass-through's)."""
    return {k.removeprefix("module."): v.detach().clone() for k, v in state.items()}


def main():
    args = parse_args()
    sys.dont_write_bytecode = True  # leave UniMatch V2's checkout as it is
    import torch
    from torch import nn
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    sys.path.insert(0, HERE)
    from record_dinov2 import perturb

    code = os.path.abspath(args.unimatch)
    sys.path.insert(0, code)
    # Modules the trainer imports whose dependencies (tensorboard, PIL, torchvision) are absent
    # here; the fakes below stand in for what it uses of them.
    recorded_scalars = {}

    class RecordingWriter:
        def __init__(self, *a, **k):
            pass

        def add_scalar(self, tag, value, step):
            recorded_scalars[(tag, int(step))] = float(value)

    class FakeSet:
        def __init__(self, name, root, mode, size=None, id_path=None, nsample=None):
            self.mode = mode
            self.ids = [f"{mode}{i}" for i in range(LOADER_LEN * BATCH)]

    sys.modules["torch.utils.tensorboard"] = types.SimpleNamespace(SummaryWriter=RecordingWriter)
    sys.modules["dataset.semi"] = types.SimpleNamespace(SemiDataset=FakeSet)
    import unimatch_v2
    import model.semseg.dpt as dpt_module
    from model.backbone.dinov2 import DinoVisionTransformer
    from model.backbone.dinov2_layers import MemEffAttention, NestedTensorBlock

    enc = BACKBONE

    def tiny_dinov2(model_name):
        assert model_name == "small", model_name
        return DinoVisionTransformer(
            img_size=enc["pos_grid"] * enc["patch_size"], patch_size=enc["patch_size"],
            embed_dim=enc["embed_dim"], depth=enc["depth"], num_heads=enc["num_heads"],
            mlp_ratio=enc["mlp_ratio"], qkv_bias=enc["qkv_bias"], ffn_layer=enc["ffn"],
            block_fn=functools.partial(NestedTensorBlock, attn_class=MemEffAttention),
            init_values=enc["layer_scale_init"], block_chunks=0, num_register_tokens=0,
            interpolate_antialias=False, interpolate_offset=enc["interpolate_offset"])

    encoder = tiny_dinov2("small")
    perturb(encoder, SEED)
    pretrained = {k: v.clone() for k, v in encoder.state_dict().items()}
    current = {"step": None}  # the step whose batch the loaders gave last

    class FedBinomial:
        """DPT's `self.binomial`: `sample((B, D))` returns the step's recorded draw."""

        def sample(self, shape):
            bern = batches[current["step"]]["comp_drop_bernoulli"]
            assert tuple(shape) == tuple(bern.shape), (shape, bern.shape)
            return bern.clone()

    built = []

    def build():
        """UniMatch V2's DPT, tiny, its head perturbed (the encoder's weights come from the
        patched torch.load)."""
        dinov2 = dpt_module.DINOv2
        dpt_module.DINOv2 = tiny_dinov2
        try:
            m = dpt_module.DPT(encoder_size="small", nclass=NCLASS, features=DPT["features"],
                               out_channels=list(DPT["out_channels"]), use_bn=False)
        finally:
            dpt_module.DINOv2 = dinov2
        m.intermediate_layer_idx = {"small": list(DPT["layers"])}
        m.binomial = FedBinomial()
        perturb(m.head, SEED + 1)
        with torch.no_grad():
            w = m.head.scratch.output_conv[2].weight  # (K, features, 1, 1)
            w.sub_(w.mean(dim=1, keepdim=True)).mul_(LOGIT_GAIN)
        return m

    def tiny_dpt(encoder_size, nclass, features, out_channels, use_bn=False):
        """The trainer's `DPT(**model_configs[size], nclass=...)`: the tiny model instead."""
        assert (encoder_size, nclass, use_bn) == ("small", NCLASS, False)
        m = build()
        built.append(m)
        return m

    initial = build()
    initial.backbone.load_state_dict(pretrained)
    initial.eval()
    with torch.no_grad():
        batches = make_batches(torch, lambda img: initial(img).argmax(dim=1))

    class PassThrough(nn.Module):
        """DistributedDataParallel on one process without its communication."""

        def __init__(self, module, **kwargs):
            super().__init__()
            self.module = module

        def forward(self, *a, **k):
            return self.module(*a, **k)

    class FakeSampler:
        def __init__(self, dataset, *a, **k):
            self.dataset = dataset

        def set_epoch(self, epoch):
            assert epoch == 0, epoch

    snapshots = []  # main()'s locals at each fetch of the labeled loader

    def trainer_locals():
        frame = sys._getframe(1)
        while frame is not None and not (frame.f_code.co_name == "main"
                                         and frame.f_globals.get("__name__") == "unimatch_v2"):
            frame = frame.f_back
        assert frame is not None, "the loader was not iterated by unimatch_v2.main"
        return frame.f_locals

    class FakeLoader:
        def __init__(self, dataset, batch_size, sampler=None, **kwargs):
            assert batch_size in (BATCH, 1), batch_size
            self.dataset, self.sampler = dataset, sampler

        def __len__(self):
            return LOADER_LEN

        def __iter__(self):
            assert self.dataset.mode in ("train_l", "train_u"), "evaluate must not run"
            self.fetches = 0
            return self

        def __next__(self):
            t = self.fetches
            self.fetches += 1
            if self.dataset.mode == "train_l":
                snapshots.append(capture(trainer_locals(), t))
                if t == STEPS:
                    raise _Stop
                current["step"] = t
                b = batches[t]
                return b["img_x"].clone(), b["mask_x"].clone()
            assert current["step"] == t
            b = batches[t]
            # Clones: the trainer mixes the strong views in place.
            return tuple(b[k].clone() for k in ("img_u_w", "img_u_s1", "img_u_s2", "ignore_mask",
                                                "cutmix_box1", "cutmix_box2"))

    def capture(loc, t):
        """What the trainer holds at fetch t: the states after step t - 1 and that step's values."""
        model, model_ema, optimizer = loc["model"], loc["model_ema"], loc["optimizer"]
        names = {id(p): n.removeprefix("module.") for n, p in model.named_parameters()}
        adam = {}
        for p in (p for group in optimizer.param_groups for p in group["params"]):
            st = optimizer.state.get(p)
            if st:
                adam[names[id(p)]] = {k: v.detach().clone() for k, v in st.items()}
        snap = dict(student=strip(model.state_dict()), ema=strip(model_ema.state_dict()),
                    adam=adam, lr=[g["lr"] for g in optimizer.param_groups],
                    betas=[g["betas"] for g in optimizer.param_groups],
                    eps=[g["eps"] for g in optimizer.param_groups],
                    weight_decay=[g["weight_decay"] for g in optimizer.param_groups],
                    group_names=[[names[id(p)] for p in g["params"]]
                                 for g in optimizer.param_groups],
                    total_iters=loc["total_iters"], cfg=dict(loc["cfg"]))
        if t > 0:
            snap["grads"] = {n.removeprefix("module."): p.grad.detach().clone()
                             for n, p in model.named_parameters() if p.grad is not None}
            for k in ("pred_u_w", "conf_u_w", "mask_u_w", "loss", "loss_x", "loss_u_s",
                      "loss_u_s1", "loss_u_s2", "mask_ratio", "ema_ratio", "iters", "img_u_s1",
                      "img_u_s2", "mask_u_w_cutmixed1", "conf_u_w_cutmixed1",
                      "ignore_mask_cutmixed1", "mask_u_w_cutmixed2", "conf_u_w_cutmixed2",
                      "ignore_mask_cutmixed2"):
                v = loc[k]
                snap[k] = v.detach().clone() if torch.is_tensor(v) else v
        return snap

    # DPT.forward's `dropout_mask`, read at its return.
    dropout_masks = []
    forward_code = dpt_module.DPT.forward.__code__

    def profiler(frame, event, arg):
        if event == "return" and frame.f_code is forward_code and frame.f_locals.get("comp_drop"):
            dropout_masks.append(frame.f_locals["dropout_mask"].detach().clone())

    randperm = torch.randperm

    def fed_randperm(n, *a, **k):
        perm = batches[current["step"]]["comp_drop_perm"]
        assert n == len(perm), (n, len(perm))
        return perm.clone()

    torch_load = torch.load

    def load(path, *a, **k):
        if str(path).startswith("./pretrained/"):
            assert path == "./pretrained/dinov2_small.pth", path
            return {k_: v.clone() for k_, v in pretrained.items()}
        return torch_load(path, *a, **k)

    patches = [
        (unimatch_v2, "setup_distributed", lambda backend="nccl", port=None: (0, 1)),
        (unimatch_v2, "DPT", tiny_dpt),
        (unimatch_v2, "DataLoader", FakeLoader),
        (torch.nn.parallel, "DistributedDataParallel", PassThrough),
        (torch.nn.SyncBatchNorm, "convert_sync_batchnorm",
         classmethod(lambda cls, module, process_group=None: module)),
        (torch.utils.data.distributed, "DistributedSampler", FakeSampler),
        (torch.Tensor, "cuda", lambda self, *a, **k: self),
        (nn.Module, "cuda", lambda self, *a, **k: self),
        (torch, "load", load),
        (torch, "randperm", fed_randperm),
    ]
    # Class attributes are restored as they were stored (a classmethod stays one); one that the
    # class only inherits is deleted again.
    saved = [(obj, name, (obj.__dict__.get(name, _INHERITED) if isinstance(obj, type)
                          else getattr(obj, name))) for obj, name, _ in patches]
    with tempfile.TemporaryDirectory() as tmp:
        argv = sys.argv
        sys.argv = ["unimatch_v2.py", "--config", write_config(tmp), "--labeled-id-path", "unused",
                    "--unlabeled-id-path", "unused", "--save-path", os.path.join(tmp, "save")]
        os.environ["LOCAL_RANK"] = "0"
        for obj, name, value in patches:
            setattr(obj, name, value)
        sys.setprofile(profiler)
        stopped = False
        try:
            unimatch_v2.main()
        except _Stop:
            stopped = True
        finally:
            sys.setprofile(None)
            for obj, name, value in saved:
                if value is _INHERITED:
                    delattr(obj, name)
                else:
                    setattr(obj, name, value)
            sys.argv = argv
    assert stopped and len(snapshots) == STEPS + 1, (stopped, len(snapshots))
    assert len(built) == 1 and len(dropout_masks) == STEPS, (len(built), len(dropout_masks))
    assert torch.randperm is randperm
    save(args.out, snapshots, batches, dropout_masks, recorded_scalars, torch)


def save(path, snapshots, batches, dropout_masks, scalars, torch):
    f32 = lambda t: t.detach().numpy().astype(np.float32)  # noqa: E731
    i32 = lambda t: t.detach().numpy().astype(np.int32)  # noqa: E731
    first = snapshots[0]
    out = {f"state0/{k}": f32(v) for k, v in first["student"].items()}
    assert all(torch.equal(first["ema"][k], v) for k, v in first["student"].items())
    assert not first["adam"]
    params = [n for g in first["group_names"] for n in g]
    assert all(n.startswith("backbone.") for n in first["group_names"][0])
    assert not any(n.startswith("backbone.") for n in first["group_names"][1])
    b, d = BATCH, BACKBONE["embed_dim"]
    counted = []  # per step, the pixels of each strong view that enter loss_s
    for t in range(STEPS):
        before, after, batch = snapshots[t], snapshots[t + 1], batches[t]
        p = f"step{t}/"
        for k in ("img_x", "img_u_w", "img_u_s1", "img_u_s2", "cutmix_box1", "cutmix_box2",
                  "comp_drop_bernoulli"):
            out[p + k] = f32(batch[k])
        for k in ("mask_x", "ignore_mask", "comp_drop_perm"):
            out[p + k] = i32(batch[k])
        scale = dropout_masks[t]
        # DPT.forward's formula, as a check of what was read from it.
        m1 = batch["comp_drop_bernoulli"] * 2.0
        m2 = 2.0 - m1
        kept = batch["comp_drop_perm"][:int(b * 0.5)]
        m1[kept], m2[kept] = 1.0, 1.0
        assert scale.shape == (2 * b, d) and torch.equal(scale, torch.cat([m1, m2]))
        out[p + "comp_drop_scale"] = f32(scale)
        out[p + "lr"] = np.array(before["lr"], np.float64)
        assert after["iters"] == t
        out[p + "ema_ratio"] = np.array(after["ema_ratio"], np.float64)
        out[p + "teacher_logits"] = f32(after["pred_u_w"])
        out[p + "conf_u_w"] = f32(after["conf_u_w"])
        out[p + "pseudo_label"] = i32(after["mask_u_w"])
        counted.append([int(((after[f"conf_u_w_cutmixed{v}"] >= CONF_THRESH)
                              & (after[f"ignore_mask_cutmixed{v}"] != 255)).sum())
                        for v in (1, 2)])
        for v in (1, 2):
            out[p + f"pseudo_label_mixed{v}"] = i32(after[f"mask_u_w_cutmixed{v}"])
            out[p + f"ignore_mask_mixed{v}"] = i32(after[f"ignore_mask_cutmixed{v}"])
        for name, tag in (("loss", "loss_all"), ("loss_x", "loss_x"), ("loss_s", "loss_s"),
                          ("mask_ratio", "mask_ratio")):
            out[p + name] = np.array(scalars[(f"train/{tag}", t)], np.float32)
        assert out[p + "loss"] == np.float32(after["loss"].item())
        assert out[p + "loss_s"] == np.float32(after["loss_u_s"].item())
        out[p + "loss_s1"] = np.array(after["loss_u_s1"].item(), np.float32)
        out[p + "loss_s2"] = np.array(after["loss_u_s2"].item(), np.float32)
        if t == 0:
            out.update({p + f"grads/{k}": f32(v) for k, v in after["grads"].items()})
        out.update({p + f"after/student/{k}": f32(v) for k, v in after["student"].items()})
        out.update({p + f"after/ema/{k}": f32(v) for k, v in after["ema"].items()})
        steps = {float(s["step"]) for s in after["adam"].values()}
        assert steps == {t + 1.0}, steps
        out[p + "after/adam_step"] = np.array(t + 1.0, np.float32)
        for k, st in after["adam"].items():
            out[p + f"after/adam_exp_avg/{k}"] = f32(st["exp_avg"])
            out[p + f"after/adam_exp_avg_sq/{k}"] = f32(st["exp_avg_sq"])
    no_grad = [n for n in params if n not in snapshots[-1]["adam"]]
    cfg = first["cfg"]
    meta = dict(
        encoder="dinov2", backbone=BACKBONE, dpt=DPT, num_classes=NCLASS,
        method="unimatch_v2", trainer="unimatch_v2.py main(), unchanged",
        yaml={k: cfg[k] for k in ("lr", "lr_multi", "conf_thresh", "nclass", "crop_size",
                                  "batch_size", "epochs", "criterion", "backbone")},
        lr=LR, lr_multi=LR_MULTI, conf_thresh=CONF_THRESH, crop_size=CROP, batch_size=BATCH,
        loader_len=LOADER_LEN, epochs=EPOCHS, total_iters=first["total_iters"], steps=STEPS,
        poly_power=0.9, ema_decay_max=0.996,
        adamw=dict(betas=list(first["betas"][0]), eps=first["eps"][0],
                   weight_decay=first["weight_decay"][0]),
        param_groups=["backbone.* at lr", "every other parameter at lr * lr_multi"],
        no_grad_params=no_grad, ignore_index=255,
        loss="(loss_x + (loss_s1 + loss_s2) / 2) / 2; loss_s{v} = sum(CE * (conf >= conf_thresh) "
             "* (ignore != 255)) / count(ignore != 255), CutMix with the flipped batch",
        seed=SEED, unimatch_v2_commit=UNIMATCH_V2_COMMIT, torch=torch.__version__)
    out["meta_json"] = np.array(json.dumps(meta))
    np.savez_compressed(path, **out)
    print(f"{path}: {len(out)} arrays, {os.path.getsize(path) / 2**10:.0f} KiB, "
          f"torch {torch.__version__}; no gradient: {no_grad}")
    for t in range(STEPS):
        p = f"step{t}/"
        passed = counted[t]
        print(f"step {t}: lr {out[p + 'lr']} loss {out[p + 'loss']:.6f} loss_x "
              f"{out[p + 'loss_x']:.6f} loss_s {out[p + 'loss_s']:.6f} (s1 "
              f"{out[p + 'loss_s1']:.6f} s2 {out[p + 'loss_s2']:.6f}) mask_ratio "
              f"{out[p + 'mask_ratio']:.3f}; pixels counted per view "
              f"{passed} of {out[p + 'pseudo_label'].size}")


if __name__ == "__main__":
    main()
