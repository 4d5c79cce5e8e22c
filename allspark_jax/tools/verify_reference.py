r"""Checks this port against numbers recorded from the official release.

    python -m allspark_jax.tools.verify_reference tests/data/allspark_tiny.npz

The file follows the layout of the reference README: `meta_json` gives the architecture, `state0/*`
the official state dict, and each case its inputs and outputs in PyTorch layouts (NCHW). Nothing
about sizes is assumed: dims, depths, heads, classes, image and batch sizes all come from the file.
One line per case: the worst per-tensor relative error ||out - ref|| / ||ref|| and the worst
absolute error; the exit status is 1 if any case is outside tolerance.

Gradients and ReLU kinks: where a pre-activation of the head's ReLU lies within float32 noise of
zero, the two implementations may take different branches, and the gradient upstream of that pixel
legitimately differs. The `grads0` case therefore reports the plain comparison and, when that fails,
the comparison with those (and only those) sub-noise pixels given the other branch, with their count.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from allspark_jax import convert, losses, optimizer, state as state_lib, train_step
from allspark_jax.evaluation import metrics
from allspark_jax.models.head import TorchBatchNorm
from allspark_jax.models.mit import MiTConfig, MixVisionTransformer
from allspark_jax.models.segmentor import AllSparkSegmentor, ModelConfig, init_variables

RTOL = 1e-4
PSEUDO_LABEL_AGREEMENT = 0.9999
# |pre-activation| below this fraction of the activations' RMS is float32 noise (the forward
# outputs agree to ~1e-6 relative), so its ReLU branch is ambiguous.
KINK_FRACTION = 1e-5
# A gradient tensor whose norm is below this fraction of the whole gradient's is round-off.
GRAD_FLOOR = 1e-6


@dataclasses.dataclass
class Result:
    name: str
    max_rel: float
    max_abs: float
    ok: bool
    note: str = ""

    def line(self) -> str:
        status = "ok  " if self.ok else "FAIL"
        return (f"{status} {self.name:<34} max rel {self.max_rel:.2e}  max abs {self.max_abs:.2e}"
                + (f"  ({self.note})" if self.note else ""))


def nhwc(x):
    return np.transpose(x, (0, 2, 3, 1)) if x.ndim == 4 else x


def compare(name: str, pairs: dict[str, tuple[np.ndarray, np.ndarray]], note: str = "") -> Result:
    """Per-tensor relative error for floats; integers must be equal."""
    max_rel = max_abs = 0.0
    ok = True
    for key, (out, ref) in pairs.items():
        out, ref = np.asarray(out), np.asarray(ref)
        if out.shape != ref.shape:
            return Result(name, np.inf, np.inf, False, f"{key}: shape {out.shape} vs {ref.shape}")
        diff = out.astype(np.float64) - ref.astype(np.float64)
        abs_err = float(np.abs(diff).max()) if diff.size else 0.0
        if ref.dtype.kind in "iub":
            rel = 0.0 if abs_err == 0 else np.inf
        else:
            rel = float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-30))
        ok &= rel <= RTOL
        max_rel, max_abs = max(max_rel, rel), max(max_abs, abs_err)
    return Result(name, max_rel, max_abs, ok, note)


class Reference:
    """The reference file with the model it describes."""

    def __init__(self, path: str):
        with np.load(path, allow_pickle=False) as f:
            self.data = {k: f[k] for k in f.files}
        self.meta = json.loads(str(self.data["meta_json"]))
        m = self.meta
        dropout = float(m.get("dropout", 0.0))
        self.backbone = MiTConfig(
            embed_dims=tuple(m["embed_dims"]), depths=tuple(m["depths"]),
            num_heads=tuple(m["num_heads"]), sr_ratios=tuple(m["sr_ratios"]),
            mlp_ratios=tuple(m["mlp_ratios"]), drop_path_rate=float(m.get("drop_path", 0.0)))
        self.model = AllSparkSegmentor(ModelConfig(
            backbone=self.backbone, num_classes=m["num_classes"], allspark_heads=m["allspark_heads"],
            decoder_dim=m["decoder_dim"], head_dropout=dropout, attn_drop=dropout,
            proj_drop=dropout))
        x_l = self.data["inputs/x_l"]
        template = jax.eval_shape(lambda: init_variables(
            self.model, jax.random.key(0), tuple(x_l.shape[2:]), x_l.shape[0]))
        self.state0 = self.prefixed("state0/")
        self.variables = jax.tree.map(jnp.asarray, convert.from_state_dict(
            self.state0, template, source=f"{path}: state0"))
        self.x_l, self.x_u = nhwc(x_l), nhwc(self.data["inputs/x_u"])
        self.mask_l = self.data["inputs/mask_l"].astype(np.int32)

    def prefixed(self, prefix: str) -> dict[str, np.ndarray]:
        return {k[len(prefix):]: v for k, v in self.data.items() if k.startswith(prefix)}

    def has(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.data)


def case_encoder(ref: Reference) -> list[Result]:
    enc = MixVisionTransformer(ref.backbone)
    results = []
    for case, x in (("encoder_eval", ref.x_l), ("encoder_eval_u", ref.x_u)):
        if not ref.has(case + "/"):
            continue
        outs = enc.apply({"params": ref.variables["params"]["backbone"]}, x)
        results.append(compare(case, {f"c{i + 1}": (o, nhwc(ref.data[f"{case}/c{i + 1}"]))
                                      for i, o in enumerate(outs)}))
    return results


def case_eval_single(ref: Reference) -> list[Result]:
    if "eval_single/logits" not in ref.data:
        return []
    out = ref.model.apply(ref.variables, ref.x_l, mode="eval")
    return [compare("eval_single", {"logits": (out, nhwc(ref.data["eval_single/logits"]))})]


def memory_rows_note(ours, refs, before, ref_before=None) -> tuple[bool, str]:
    """Same (class, row) slots written as the reference? (Values are checked separately.)"""
    written = lambda m, b: np.any(m != b, axis=-1)  # noqa: E731
    ref_written = written(refs, before if ref_before is None else ref_before)
    same = bool(np.array_equal(written(ours, before), ref_written))
    return same, f"{int(ref_written.sum())} memory rows written" + ("" if same else ", ROWS DIFFER")


def case_train_forward(ref: Reference) -> list[Result]:
    results = []
    for name, use_memory in (("train_forward_nomem", False), ("train_forward_mem", True)):
        if not ref.has(name + "/"):
            continue
        teacher = ref.model.apply(ref.variables, ref.x_u, mode="teacher")
        logits, updates = ref.model.apply(
            ref.variables, np.concatenate([ref.x_l, ref.x_u]), mode="train", teacher_logits=teacher,
            use_memory=use_memory, mutable=["batch_stats", "memory"])
        after = convert.to_state_dict({**updates, "params": {}})
        ref_after = ref.prefixed(f"{name}/after/")
        pairs = {"teacher_logits": (teacher, nhwc(ref.data[f"{name}/teacher_logits"])),
                 "logits": (logits, nhwc(ref.data[f"{name}/logits"]))}
        pairs.update({k: (after[k], v) for k, v in ref_after.items()})
        result = compare(name, pairs)
        mem_key = next((k for k in ref_after if k.endswith("kv_queue")), None)
        if mem_key:
            same, note = memory_rows_note(after[mem_key], ref_after[mem_key], ref.state0[mem_key])
            result.ok &= same
            result.note = note
        results.append(result)
    return results


def case_losses(ref: Reference) -> list[Result]:
    if "loss/logits" not in ref.data:
        return []
    logits, target = nhwc(ref.data["loss/logits"]), ref.data["loss/target"].astype(np.int32)
    ohem = ref.meta.get("ohem", {})
    ignore = int(ohem.get("ignore_index", 255))
    pairs = {"ce": (losses.cross_entropy(logits, target, ignore_index=ignore), ref.data["loss/ce"])}
    for key in ref.data:
        m = re.fullmatch(r"loss/ohem_min_kept(\d+)", key)
        if m:
            out = losses.ohem_cross_entropy(logits, target, thresh=float(ohem.get("thresh", 0.7)),
                                            min_kept=int(m.group(1)), ignore_index=ignore)
            pairs[key.split("/")[1]] = (out, ref.data[key])
    return [compare("loss (ce, ohem)", pairs)]


def case_miou(ref: Reference) -> list[Result]:
    if "miou/pred" not in ref.data:
        return []
    k = ref.meta["num_classes"]
    inter, union, area = metrics.intersection_and_union(ref.data["miou/pred"],
                                                         ref.data["miou/target"], k)
    return [compare("miou counting", {"intersection": (inter, ref.data["miou/intersection"]),
                                      "union": (union, ref.data["miou/union"]),
                                      "target_area": (area, ref.data["miou/target_area"])})]


def _kink_flip(tau_fraction: float) -> Callable:
    """Interceptor: gives the head's sub-noise ReLU inputs the other branch (forward change <= tau)."""

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, TorchBatchNorm) and context.method_name == "__call__":
            y = jax.lax.stop_gradient(out)
            tau = tau_fraction * jnp.sqrt(jnp.mean(jnp.square(y)))
            kink = jnp.abs(y) < tau
            context.module.sow("intermediates", "kinks", jnp.sum(kink))
            out = out - 2.0 * jnp.where(kink, y, 0.0)
        return out

    return interceptor


def reference_batches(ref: Reference, steps: int) -> list[dict]:
    """The README's protocol: step 1 on both batches flipped left-right, the others as given."""
    batches = []
    for t in range(steps):
        flip = (lambda a: a[:, :, ::-1]) if t == 1 else (lambda a: a)  # noqa: E731
        x_u = np.ascontiguousarray(flip(ref.x_u))
        batches.append({"image_l": np.ascontiguousarray(flip(ref.x_l)),
                        "mask_l": np.ascontiguousarray(flip(ref.mask_l)), "image_u_w": x_u,
                        "image_u_s": x_u, "pad_u": np.zeros(ref.mask_l.shape, bool)})
    return batches


def case_train_steps(ref: Reference) -> list[Result]:
    if "train_step/lrs" not in ref.data:
        return []
    m = ref.meta
    lrs = ref.data["train_step/lrs"]
    steps = lrs.shape[0]
    optim = ml_collections.ConfigDict(dict(lr=m["lr"], lr_multi=m["lr_multi"],
                                           momentum=m["momentum"], weight_decay=m["weight_decay"],
                                           poly_power=0.9))
    tcfg = ml_collections.ConfigDict(dict(loss_x="ce", loss_groups=1, teacher="online",
                                          ema_decay=0.0, conf_thresh=0.0,
                                          loss_u_ignore_padding=False, key_group_size=None))
    tx, schedules = optimizer.create_optimizer(optim, m["total_iters"])
    ours_lrs = np.array([[schedules["encoder"](t), schedules["rest"](t)] for t in range(steps)])
    results = [compare("train_step lrs", {"lrs": (ours_lrs, lrs)})]

    state = state_lib.create_train_state(ref.model, tx, jax.random.key(0), ref.x_l.shape[1], ema=False,
                                     variables=jax.tree.map(jnp.copy, ref.variables))
    step = train_step.make_train_step(ref.model, tx, tcfg, use_memory=True, with_outputs=True)
    batches = reference_batches(ref, steps)
    for t, batch in enumerate(batches):
        before = convert.to_state_dict(state.variables())
        ref_before = ref.state0 if t == 0 else ref.prefixed(f"train_step/state{t}/")
        if t == 0:
            grad_state = jax.tree.map(jnp.copy, state)
        state, out = step(state, batch)
        agree = float(np.mean(np.asarray(out["pseudo_label"]) == ref.data[f"train_step/pseudo_label{t}"]))
        r = compare(f"train_step {t} losses", {
            "loss_x": (out["loss_x"], ref.data[f"train_step/loss_x{t}"]),
            "loss_u": (out["loss_u"], ref.data[f"train_step/loss_u{t}"])},
            note=f"pseudo-labels agree on {agree:.4%} of pixels")
        r.ok &= agree >= PSEUDO_LABEL_AGREEMENT
        results.append(r)
        if t == 0 and ref.has("train_step/grads0/"):
            results.append(grads_case(ref, out["grads"], grad_state, batch, tx, tcfg))
        if ref.has(f"train_step/state{t + 1}/"):
            sd = convert.to_state_dict(state.variables())
            refs = ref.prefixed(f"train_step/state{t + 1}/")
            r = compare(f"train_step state{t + 1}", {k: (sd[k], v) for k, v in refs.items()})
            mem_key = next((k for k in refs if k.endswith("kv_queue")), None)
            if mem_key:
                same, note = memory_rows_note(sd[mem_key], refs[mem_key], before[mem_key],
                                              ref_before[mem_key])
                r.ok &= same
                r.note = note
            results.append(r)
    return results


def grads_case(ref, grads, state, batch, tx, tcfg) -> Result:
    """grads0, with two float32 facts accounted for (and reported):

    * a gradient that is zero in exact arithmetic (a bias feeding a batch-statistics BN) is
      recorded as round-off; such tensors (norm below GRAD_FLOOR x the whole gradient's) must be
      round-off on our side too: ||out|| and ||out - ref|| below that floor;
    * ReLU inputs within float32 noise of 0 may take the other branch (see the module docstring).
    """
    refs = ref.prefixed("train_step/grads0/")
    floor = GRAD_FLOOR * float(np.sqrt(sum(np.sum(np.square(v, dtype=np.float64))
                                           for v in refs.values())))
    zeros = sorted(k for k, v in refs.items() if np.linalg.norm(v) < floor)

    def check(grads, note):
        ours = convert.to_state_dict({"params": grads})
        r = compare("train_step grads0", {k: (ours[k], v) for k, v in refs.items()
                                          if k not in zeros}, note)
        zeros_ok = all(max(np.linalg.norm(ours[k]), np.linalg.norm(ours[k] - refs[k])) < floor
                       for k in zeros)
        r.ok &= zeros_ok
        if zeros:
            r.note = "; ".join(filter(None, (r.note, (
                f"{len(zeros)} round-off-only tensor(s) (< {floor:.1e}) "
                f"{'are round-off here too' if zeros_ok else 'ARE NOT ZERO HERE'}: {', '.join(zeros)}"))))
        return r

    plain = check(grads, "")
    if plain.ok:
        return plain
    with nn.intercept_methods(_kink_flip(KINK_FRACTION)):
        _, out = jax.jit(lambda s, b: train_step.train_step(
            s, b, model=ref.model, tx=tx, train_config=tcfg, use_memory=True))(state, batch)
        kinks = int(jax.jit(lambda v: ref.model.apply(
            v, np.concatenate([batch["image_l"], batch["image_u_s"]]), mode="train",
            teacher_logits=ref.model.apply(v, batch["image_u_w"], mode="teacher"), use_memory=True,
            mutable=["intermediates", "batch_stats", "memory"])[1]["intermediates"]["head"]
            ["linear_fuse"]["bn"]["kinks"][0])(state.variables()))
    result = check(out["grads"], f"plain max rel {plain.max_rel:.2e}; {kinks} ReLU input(s) within "
                                 f"{KINK_FRACTION:g} x RMS of 0 given the other branch")
    result.ok &= kinks > 0
    return result


CASES = (case_encoder, case_eval_single, case_train_forward, case_losses, case_miou,
         case_train_steps)


def verify(path: str, print_fn=print) -> list[Result]:
    ref = Reference(path)
    print_fn(f"{path}: {json.dumps({k: ref.meta[k] for k in ('embed_dims', 'depths', 'num_classes') if k in ref.meta})}, "
             f"image {ref.x_l.shape[1]}x{ref.x_l.shape[2]}, batch {ref.x_l.shape[0]}")
    results = []
    for case in CASES:
        for r in case(ref):
            print_fn(r.line())
            results.append(r)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="reference .npz files")
    args = parser.parse_args(argv)
    failed = 0
    for path in args.files:
        results = verify(path)
        bad = [r.name for r in results if not r.ok]
        failed += len(bad)
        print(f"{path}: {len(results) - len(bad)} cases ok, {len(bad)} failed"
              + (f" ({', '.join(bad)})" if bad else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
