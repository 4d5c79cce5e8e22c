#!/usr/bin/env python
"""Runs one of the release's trainers as it is, on the CPU, in one process, for
`python -m allspark_jax.experiments.versus_release_training` (which writes the spec this reads).

    /path/to/venv-with-torch/bin/python benchmarks/release_training.py --release DIR --spec spec.json

`--release` is a folder holding `allspark_release/` (the authors' files: `train_allspark.py`,
`train_baseline_semi.py`, `train_baseline_sup.py`, `model/`, `util/`, and `dataset/` for the
release's own augmentation) and `shim/` (stand-ins for mmcv's ConvModule and timm's helpers). Nothing
of the release is copied here: its trainer module is imported and its `main()` runs unchanged --
its model, loss, Semantic Memory update, warm-up switch (`set_SMem_status` per epoch), poly
schedule, BatchNorm and SGD. What a CPU process cannot provide is stood in for, around it:

- `util.dist_helper.setup_distributed`: a one-process gloo group (its barriers and all-reduces run);
  `DistributedDataParallel`: a wrapper with `.module` (one process: no gradient averaging);
  `SyncBatchNorm.convert_sync_batchnorm`: the model unchanged (in one process SyncBN is BatchNorm);
  `.cuda()`: the tensor or module itself.
- `torch.utils.tensorboard.SummaryWriter`: records every `add_scalar` (the per-step losses).
- `util.classes.CLASSES`: the spec's class names.
- `model_helper.ModelBuilder` (the trainer's name for it): the release's ModelBuilder with the spec's
  architecture (a MiT given by its fields: the yaml files can only name the B0-B5 presets), its
  state set from the spec's `init` state dict (strict). With `dropout` false every Dropout,
  Dropout2d and stochastic-depth rate is 0, so that the run is a deterministic function of its
  start and batches.
- The trainer's `evaluate`: run (unchanged) after the last epoch only; its mIoU is reported.
- Batches: with `batches` set (a folder of .npy arrays, step-major, NHWC, already augmented and
  normalised), `dataset.semi.SemiDataset` gives sample `j` of step `epoch * steps_per_epoch + i` in
  loader position (epoch, i, j) and `DistributedSampler` walks each epoch in order. Without it the
  release's own `dataset/semi.py` runs on the spec's image files with its own randomness (seeded
  from the spec's seed: `random`, numpy, torch), its DistributedSampler shuffling as released.

Writes into the spec's `out` folder: `losses.json` ({tag: [value per step]} for every scalar the
trainer logged, `miou` of its evaluate, `seconds`, `torch`, `queue_ptr`: AllSpark's memory write
pointers after each step, [] without AllSpark), `final.npz` (the model's state dict
after the last step, names as the release's ModelBuilder gives them) and, for each step N of the
spec's `states_at`, `state_N.npz` (the state after the N-th optimizer step: its SGD, subclassed).
"""
import argparse
import importlib
import json
import os
import random
import sys
import time
import types
from functools import partial

import numpy as np

TRAINERS = {"allspark": "train_allspark", "semi": "train_baseline_semi",
            "supervised": "train_baseline_sup"}
DECODERS = {"allspark": "model.semseg.allspark.SemiDecoder",
            "semi": "model.semseg.semidec_base.SemiDecoder",
            "supervised": "model.semseg.semidec_base.SemiDecoder"}
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def _module(name, **attrs):
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    sys.modules[name] = m
    return m


class Recorder:
    """torch.utils.tensorboard.SummaryWriter's add_scalar, kept in memory."""
    scalars = {}

    def __init__(self, *args, **kwargs):
        pass

    def add_scalar(self, tag, value, step):
        Recorder.scalars.setdefault(tag, {})[int(step)] = float(value)

    def close(self):
        pass


def _import_torchvision():
    """torchvision's transforms (the release's dataset code) need none of its compiled operators; a
    torchvision built for another torch fails registering them, so those registrations are skipped
    when the plain import fails."""
    try:
        import torchvision  # noqa: F401
    except (RuntimeError, OSError):
        for k in [k for k in sys.modules if k.startswith("torchvision")]:
            del sys.modules[k]
        for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
            _module(name)
        import torchvision  # noqa: F401


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--release", required=True)
    p.add_argument("--spec", required=True)
    args = p.parse_args()
    with open(args.spec) as f:
        spec = json.load(f)
    out = os.path.abspath(spec["out"])
    os.makedirs(out, exist_ok=True)
    code = os.path.join(os.path.abspath(args.release), "allspark_release")
    for path in (os.path.join(os.path.abspath(args.release), "shim"), code):
        if not os.path.isdir(path):
            sys.exit(f"--release={args.release}: no {os.path.basename(path)}/ folder there")
        sys.path.insert(0, path)

    import torch
    import torch.distributed as dist
    from torch import nn
    import torch.utils.data.distributed as tud
    from torch.utils.data import Dataset, Sampler

    seed = int(spec["seed"])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(int(spec.get("threads") or torch.get_num_threads()))

    # --- the process group, devices and parallel wrappers of one CPU process
    def setup_distributed(backend="nccl", port=None):
        del backend, port
        if not dist.is_initialized():
            dist.init_process_group("gloo", init_method="file://" + os.path.join(out, "pg_store"),
                                    rank=0, world_size=1)
        return 0, 1

    class OneProcess(nn.Module):
        def __init__(self, module, **kwargs):
            super().__init__()
            self.module = module

        def forward(self, *a, **k):
            return self.module(*a, **k)

    os.environ["LOCAL_RANK"] = "0"
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
    nn.SyncBatchNorm.convert_sync_batchnorm = staticmethod(lambda module, *a, **k: module)
    torch.nn.parallel.DistributedDataParallel = OneProcess
    _module("torch.utils.tensorboard", SummaryWriter=Recorder)
    _module("util.dist_helper", setup_distributed=setup_distributed)
    _module("util.classes", CLASSES={"pascal": list(spec["class_names"])})

    # --- the data: the written batches, or the release's own dataset code
    arch = spec["architecture"]
    batch = int(spec["cfg"]["batch_size"])
    if spec.get("batches"):
        arrays = {k[:-4]: np.load(os.path.join(spec["batches"], k), mmap_mode="r")
                  for k in os.listdir(spec["batches"]) if k.endswith(".npy")}

        def read_list(path):
            with open(path) as f:
                return f.read().splitlines()

        class WrittenBatches(Dataset):
            """The release's SemiDataset interface over the written batches."""

            def __init__(self, name, root, mode, size=None, id_path=None, nsample=None):
                self.mode, self.root = mode, root
                if mode == "val":
                    self.ids = read_list(spec["data"]["val"])
                else:  # the release's lists (the labeled one repeated to `nsample`)
                    self.ids = read_list(id_path)
                    if mode == "train_l" and nsample is not None:
                        self.ids = (self.ids * -(-nsample // len(self.ids)))[:nsample]
                    self.n, self.per_epoch = len(self.ids), len(self.ids) // batch

            def __len__(self):
                return len(self.ids)

            def __getitem__(self, index):
                if self.mode == "val":
                    from PIL import Image
                    id_ = self.ids[index]
                    img, mask = (os.path.join(self.root, p) for p in id_.split(" ")[:2])
                    x = (np.asarray(Image.open(img).convert("RGB"), np.float32) / 255 - MEAN) / STD
                    y = np.array(Image.open(mask))
                    return (torch.from_numpy(x.transpose(2, 0, 1).astype(np.float32)),
                            torch.from_numpy(y).long(), id_)
                epoch, k = divmod(index, self.n)
                step, j = epoch * self.per_epoch + k // batch, k % batch
                key = "image_l" if self.mode == "train_l" else "image_u"
                if step >= arrays[key].shape[0]:
                    raise IndexError(f"{spec['batches']}: {key} holds {arrays[key].shape[0]} steps; "
                                     f"the trainer asked for step {step}")
                img = torch.from_numpy(np.ascontiguousarray(arrays[key][step, j].transpose(2, 0, 1)))
                if self.mode == "train_u":
                    return img
                return img, torch.from_numpy(np.asarray(arrays["mask_l"][step, j])).long()

        class InOrder(Sampler):
            """DistributedSampler's interface; epoch e yields e * len + 0 .. len - 1."""

            def __init__(self, dataset, *a, **k):
                self.n, self.epoch = len(dataset), 0

            def set_epoch(self, epoch):
                self.epoch = epoch

            def __iter__(self):
                return iter(range(self.epoch * self.n, (self.epoch + 1) * self.n))

            def __len__(self):
                return self.n

        _module("dataset")
        _module("dataset.semi", SemiDataset=WrittenBatches)
        tud.DistributedSampler = InOrder
    else:
        if not os.path.isfile(os.path.join(code, "dataset", "semi.py")):
            sys.exit(f"--release={args.release}: no allspark_release/dataset/semi.py (the release's "
                     "dataset code), needed for its own augmentation")
        _import_torchvision()
        # The release reads the validation list from splits/<dataset>/val.txt under the cwd.
        os.makedirs(os.path.join(out, "cwd", "splits", "pascal"), exist_ok=True)
        with open(spec["data"]["val"]) as f, \
                open(os.path.join(out, "cwd", "splits", "pascal", "val.txt"), "w") as g:
            g.write(f.read())
        os.chdir(os.path.join(out, "cwd"))

    # --- the model: the release's ModelBuilder with the spec's architecture and start
    from model.model_helper import ModelBuilder
    method = spec["method"]
    dims = list(arch["embed_dims"])
    drop = bool(spec["dropout"])
    net = {
        "backbone": {"type": "model.backbone.mit.MixVisionTransformer", "kwargs": dict(
            patch_size=4, embed_dims=dims, num_heads=list(arch["num_heads"]),
            mlp_ratios=list(arch["mlp_ratios"]), qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=float(arch["norm_eps"])),
            depths=list(arch["depths"]), sr_ratios=list(arch["sr_ratios"]), drop_rate=0.0,
            attn_drop_rate=0.0, drop_path_rate=float(arch["drop_path_rate"]) if drop else 0.0)},
        "decoder": {"type": DECODERS[method], "kwargs": dict(
            num_heads=int(arch["allspark_heads"]), num_class=int(arch["num_classes"]),
            in_planes=dims, image_size=int(arch["crop_size"]),
            warmup_epoch=int(arch["warmup_epoch"]), embedding_dim=int(arch["decoder_dim"]))},
    }
    init = {k: torch.from_numpy(np.asarray(v)) for k, v in np.load(spec["init"]).items()}

    built = {}

    def build(_cfg_model):
        model = built["model"] = ModelBuilder(net)
        if not drop:
            for m in model.modules():
                if isinstance(m, (nn.Dropout, nn.Dropout2d)):
                    m.p = 0.0
        model.load_state_dict(init, strict=True)
        return model

    trainer = importlib.import_module(TRAINERS[method])
    trainer.ModelBuilder = build
    states_at = {int(s) for s in spec.get("states_at", [])}
    queue_ptr = []  # the memory's write pointers after each optimizer step

    class SGD(trainer.SGD):
        """The trainer's SGD, saving the model's state after the optimizer steps in `states_at` and
        the Semantic Memory's write pointers after every step."""
        steps = 0

        def step(self, *a, **k):
            result = super().step(*a, **k)
            SGD.steps += 1
            for name, v in built["model"].state_dict().items():
                if name.endswith("queue_ptr"):  # AllSpark's Semantic Memory
                    queue_ptr.append(v.detach().numpy().tolist())
            if SGD.steps in states_at:
                np.savez(os.path.join(out, f"state_{SGD.steps}.npz"),
                         **{k: v.detach().numpy() for k, v in built["model"].state_dict().items()})
            return result

    trainer.SGD = SGD
    epochs = int(spec["cfg"]["epochs"])
    evaluations = []
    calls = [0]

    def evaluate_last(model, loader, mode, cfg):
        calls[0] += 1
        if calls[0] < epochs:
            return 0.0, np.zeros(int(cfg["nclass"]))
        miou, iou = trainer.__dict__["_release_evaluate"](model, loader, mode, cfg)
        evaluations.append(float(miou))
        return miou, iou

    trainer._release_evaluate = trainer.evaluate
    trainer.evaluate = evaluate_last

    import yaml
    cfg = dict(spec["cfg"], model=None)
    with open(os.path.join(out, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    save = os.path.join(out, "save")
    sys.argv = [trainer.__file__, "--config", os.path.join(out, "config.yaml"),
                "--labeled-id-path", spec["data"]["labeled"],
                "--unlabeled-id-path", spec["data"]["unlabeled"], "--save-path", save]
    if "--seed" in trainer.parser.format_usage():
        sys.argv += ["--seed", str(seed)]
    t0 = time.time()
    trainer.main()
    seconds = time.time() - t0
    # written by the trainer just now (its epoch counters hold numpy scalars)
    state = torch.load(os.path.join(save, "latest.pth"), map_location="cpu",
                       weights_only=False)["model"]
    np.savez(os.path.join(out, "final.npz"),
             **{k.removeprefix("module."): v.numpy() for k, v in state.items()})
    losses = {tag: [by_step[s] for s in sorted(by_step)] for tag, by_step in Recorder.scalars.items()
              if tag.startswith("train/")}
    with open(os.path.join(out, "losses.json"), "w") as f:
        json.dump({"losses": losses, "miou": evaluations[-1] if evaluations else None,
                   "seconds": seconds, "torch": torch.__version__, "queue_ptr": queue_ptr}, f)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
