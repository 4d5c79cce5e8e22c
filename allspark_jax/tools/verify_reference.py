r"""Checks this port against numbers recorded from the official release.

    python -m allspark_jax.tools.verify_reference tests/data/allspark_tiny.npz tests/data/baselines_tiny.npz

allspark_tiny.npz holds AllSpark's numbers (train_allspark.py), baselines_tiny.npz those of the
release's semi and supervised baselines (semidec_base.SemiDecoder: `meta_json` "allspark": false;
train_baseline_semi.py as `semi_step/*`, train_baseline_sup.py as `sup_step/*`);
dpt_tiny.npz and dpt_tiny_eval.npz UniMatch V2's DPT model's forward and evaluation, from its own
code (`allspark_jax.tools.verify_dpt`); unimatch_v2_tiny.npz three steps of UniMatch V2's own
trainer (`meta_json` "method": "unimatch_v2"; `allspark_jax.tools.verify_unimatch_v2`);
allspark_dinov2_tiny.npz (`meta_json` "encoder": "dinov2")
the release's AllSpark module on UniMatch V2's DINOv2 + DPT head (state dict of `allspark_jax.weights.dinov2.segmentor_from_state_dict`),
with `train_step/*` (AllSpark) and `semi_step/*` (the same model without AllSpark, state0 less its
`allspark.*` keys). The file follows the layout of the reference README: `meta_json` gives the
architecture, `state0/*` the official state dict, and each case its inputs and outputs in PyTorch
layouts (NCHW). Nothing about sizes is assumed: dims, depths, heads, classes, image and batch sizes
all come from the file. A step sequence whose method has no AllSpark module runs the model without
it when the file's model has one.
`--precision` (default `highest`: full float32, at which the tolerances were set) is JAX's
arithmetic for float32 matrix products and convolutions; the first line printed names it with the
backend. One line per case: `ok` or `FAIL`, the worst per-tensor relative error ||out - ref|| / ||ref||,
the worst absolute error and the tolerance applied (see "Tolerances" below). A file fails when any
case fails, when any value on either side is NaN or infinite (named by tensor), or when it holds no
case at all; the exit status is then 1, else 0.

Gradients and ReLU kinks: where a pre-activation of the head's ReLU lies within float32 noise of
zero, the two implementations may take different branches, and the gradient upstream of that pixel
legitimately differs. When the plain `grads0` comparison fails, the verifier finds the head's ReLU
inputs within KINK_FRACTION x RMS of zero; if there are 1 to MAX_KINK_FLIPS of them it gives those
(and only those) the other branch and compares again. A pass that needed this is printed `ok*`
with the flipped positions, never as a plain `ok`.
"""
from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from typing import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from allspark_jax.errors import ReferenceFileError
from allspark_jax import losses, optimizer, state as state_lib, train_step
from allspark_jax import method as method_lib
from allspark_jax.configs import default
from allspark_jax.evaluation import bucketing, metrics
from allspark_jax.models.layers import TorchBatchNorm
from allspark_jax.models.dinov2 import DINOv2Config
from allspark_jax.models.dpt import DPTConfig
from allspark_jax.models.mit import MiTConfig, MixVisionTransformer
from allspark_jax.models.segmentor import PRECISIONS, AllSparkSegmentor, ModelConfig, init_variables
from allspark_jax.tools import verify_dpt, verify_unimatch_v2
# The comparison and its tolerances are shared with the UniMatch V2 recordings' verifiers.
from allspark_jax.tools.comparison import (  # noqa: F401
    FORWARD_RTOL, PSEUDO_LABEL_AGREEMENT, TRAINED_RTOL, Result, compare, nhwc)
from allspark_jax.weights import dinov2 as dinov2_weights
from allspark_jax.weights import release

# ---------------------------------------------------------------------------------- Tolerances
# Per tensor, ||ours - reference|| / ||reference||; integer tensors (mIoU counts, write pointers,
# num_batches_tracked) must be equal. FORWARD_RTOL, TRAINED_RTOL and PSEUDO_LABEL_AGREEMENT:
# `comparison` (shared with the UniMatch V2 recordings' verifiers).
# |pre-activation| below this fraction of the activations' RMS is float32 noise (the forward
# outputs agree to ~1e-6 relative), so its ReLU branch is ambiguous.
KINK_FRACTION = 1e-5
# The gradient fallback may give at most this many such ReLU inputs the other branch. On the
# shipped file exactly one input is that close to zero; more than a handful means the activations
# themselves differ, which no branch choice excuses.
MAX_KINK_FLIPS = 8
# A gradient tensor whose norm is below this fraction of the whole gradient's is round-off.
GRAD_FLOOR = 1e-6


def _tuples(fields: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


class Reference:
    """The reference file with the model it describes.

    `meta_json` "encoder" (default "mit"): "mit" describes the MiT encoder by the fields of
    allspark_tiny.npz (`embed_dims`, `depths`, ...), the release's state-dict names; "dinov2" by
    `backbone` (DINOv2Config fields) and `dpt` (DPTConfig fields but num_classes), the names of
    `weights.dinov2.segmentor_from_state_dict`.
    """

    REQUIRED = ("meta_json", "inputs/x_l", "inputs/x_u", "inputs/mask_l")

    def __init__(self, path: str, allspark: bool | None = None):
        """`allspark`: the model with (True) or without (False) the AllSpark module; None: as the
        file's `meta_json` "allspark" (default true). Without it, state0's AllSpark keys are
        not read."""
        self.path = path
        with np.load(path, allow_pickle=False) as f:
            self.data = {k: f[k] for k in f.files}
        missing = [k for k in self.REQUIRED if k not in self.data]
        missing += [] if self.has("state0/") else ["state0/*"]
        if missing:
            raise ReferenceFileError(f"{path}: not a reference file: it lacks "
                                     f"{', '.join(missing)}")
        self.meta = json.loads(str(self.data["meta_json"]))
        m = self.meta
        dropout = float(m.get("dropout", 0.0))
        self.encoder = m.get("encoder", "mit")
        # `allspark` False: the release's baselines (semidec_base.SemiDecoder), no AllSpark module.
        self.file_allspark = bool(m.get("allspark", True))
        self.allspark = self.file_allspark if allspark is None else bool(allspark)
        if self.encoder not in ("mit", "dinov2"):
            raise ReferenceFileError(f"{path}: meta_json encoder {self.encoder!r}; expected "
                                     "'mit' or 'dinov2'")
        try:
            if self.encoder == "mit":
                self.backbone, dpt = MiTConfig(
                    embed_dims=tuple(m["embed_dims"]), depths=tuple(m["depths"]),
                    num_heads=tuple(m["num_heads"]), sr_ratios=tuple(m["sr_ratios"]),
                    mlp_ratios=tuple(m["mlp_ratios"]),
                    drop_path_rate=float(m.get("drop_path", 0.0))), None
                self.to_state_dict, from_state_dict = release.to_state_dict, release.from_state_dict
                allspark_prefix = release.torch_name(("allspark", "x"))[:-1]
            else:
                self.backbone = DINOv2Config(**_tuples(m["backbone"]))
                dpt = DPTConfig(num_classes=m["num_classes"], **_tuples(m["dpt"]))
                self.to_state_dict = dinov2_weights.segmentor_to_state_dict
                from_state_dict = dinov2_weights.segmentor_from_state_dict
                allspark_prefix = dinov2_weights.ALLSPARK_PREFIX + "."
            self.model = AllSparkSegmentor(ModelConfig(
                backbone=self.backbone, num_classes=m["num_classes"],
                allspark_heads=m["allspark_heads"] if self.allspark else 1,
                decoder_dim=m.get("decoder_dim", 0), head_dropout=dropout, attn_drop=dropout,
                proj_drop=dropout, allspark=self.allspark, dpt=dpt))
        except (KeyError, TypeError, ValueError) as e:
            raise ReferenceFileError(f"{path}: meta_json does not describe a model: "
                                     f"{type(e).__name__} {e}") from e
        x_l = self.data["inputs/x_l"]
        template = jax.eval_shape(lambda: init_variables(
            self.model, jax.random.key(0), tuple(x_l.shape[2:]), x_l.shape[0]))
        self.state0 = self.prefixed("state0/")
        if self.file_allspark and not self.allspark:
            self.state0 = {k: v for k, v in self.state0.items()
                           if not k.startswith(allspark_prefix)}
        self.variables = jax.tree.map(jnp.asarray, from_state_dict(
            self.state0, template, source=f"{path}: state0"))
        self.x_l, self.x_u = nhwc(x_l), nhwc(self.data["inputs/x_u"])
        self.mask_l = self.data["inputs/mask_l"].astype(np.int32)

    def for_method(self, method: method_lib.Method) -> "Reference":
        """This reference, or the same file's model without AllSpark for a method without it."""
        if method.allspark == self.allspark:
            return self
        if method.allspark:
            raise ReferenceFileError(f"{self.path}: method {method.name!r} needs the AllSpark "
                                     "module; the file's model has none")
        return _without_allspark(self.path)

    def prefixed(self, prefix: str) -> dict[str, np.ndarray]:
        return {k[len(prefix):]: v for k, v in self.data.items() if k.startswith(prefix)}

    def has(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.data)


@functools.lru_cache(maxsize=4)
def _without_allspark(path: str) -> Reference:
    return Reference(path, allspark=False)


def case_encoder(ref: Reference) -> list[Result]:
    results = []
    for case, x in (("encoder_eval", ref.x_l), ("encoder_eval_u", ref.x_u)):
        if not ref.has(case + "/"):
            continue
        if ref.encoder != "mit":
            raise ReferenceFileError(f"{ref.path}: {case}/ (the MiT stages c1..c4) in a file of "
                                     f"encoder {ref.encoder!r}")
        enc = MixVisionTransformer(ref.backbone)
        outs = enc.apply({"params": ref.variables["params"]["backbone"]}, x)
        results.append(compare(case, {f"c{i + 1}": (o, nhwc(ref.data[f"{case}/c{i + 1}"]))
                                      for i, o in enumerate(outs)}, FORWARD_RTOL))
    return results


# eval_single again through the size-bucketed evaluation program: the images zero-padded into a
# larger bucket (odd margins, an empty slot), their true size an input of the program.
BUCKET_MARGIN = (19, 7)


def case_eval_single(ref: Reference) -> list[Result]:
    if "eval_single/logits" not in ref.data:
        return []
    expected = nhwc(ref.data["eval_single/logits"])
    out = ref.model.apply(ref.variables, ref.x_l, mode="eval")
    result = compare("eval_single", {"logits": (out, expected)}, FORWARD_RTOL)
    images = list(np.asarray(ref.x_l))
    h, w = images[0].shape[:2]
    batch, sizes = bucketing.pad_batch(images, (h + BUCKET_MARGIN[0], w + BUCKET_MARGIN[1]),
                                       len(images) + 1)
    logits = bucketing.make_logits_fn(ref.model)(ref.variables, batch, sizes)
    bucketed = np.stack(bucketing.unpad(logits, sizes)[:len(images)])
    return [result, compare("eval_single_bucketed", {"logits": (bucketed, expected)},
                            FORWARD_RTOL)]


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
        after = ref.to_state_dict({**updates, "params": {}})
        ref_after = ref.prefixed(f"{name}/after/")
        pairs = {"teacher_logits": (teacher, nhwc(ref.data[f"{name}/teacher_logits"])),
                 "logits": (logits, nhwc(ref.data[f"{name}/logits"]))}
        pairs.update({k: (after[k], v) for k, v in ref_after.items()})
        result = compare(name, pairs, FORWARD_RTOL)
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
    return [compare("loss (ce, ohem)", pairs, FORWARD_RTOL)]


def case_miou(ref: Reference) -> list[Result]:
    if "miou/pred" not in ref.data:
        return []
    k = ref.meta["num_classes"]
    inter, union, area = metrics.intersection_and_union(ref.data["miou/pred"],
                                                         ref.data["miou/target"], k)
    return [compare("miou counting", {"intersection": (inter, ref.data["miou/intersection"]),
                                      "union": (union, ref.data["miou/union"]),
                                      "target_area": (area, ref.data["miou/target_area"])},
                    FORWARD_RTOL)]  # integers: exact


def _kink_interceptor(tau_fraction: float, flip: np.ndarray | None = None) -> Callable:
    """Interceptor on training-mode `TorchBatchNorm` calls (the head's BN, which feeds its ReLU).

    Without `flip`: sows the mask of outputs within `tau_fraction` x their RMS of zero
    ("intermediates"/"kinks"). With `flip` (such a mask): gives exactly those outputs the other
    ReLU branch, y -> -y in value with the gradient of y (a change of at most tau in the forward).
    """

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        train = kwargs.get("train", args[1] if len(args) > 1 else False)
        if (isinstance(context.module, TorchBatchNorm) and context.method_name == "__call__"
                and train):
            y = jax.lax.stop_gradient(out)
            if flip is None:
                tau = tau_fraction * jnp.sqrt(jnp.mean(jnp.square(y)))
                context.module.sow("intermediates", "kinks", jnp.abs(y) < tau)
            else:
                out = out - 2.0 * jnp.where(flip, y, 0.0)
        return out

    return interceptor


def kink_positions(ref: Reference, variables, batch: dict, tau_fraction: float,
                   method: str = "allspark") -> np.ndarray:
    """Mask (N, H, W, C) of the head's training-mode BN outputs within `tau_fraction` x RMS of 0,
    in the student pass of a `method` step on `batch`."""

    resolved = release_method(method)

    def forward(v):
        if resolved.labeled_only:
            x, teacher = batch["image_l"], None
        else:
            x = np.concatenate([batch["image_l"], batch["image_u_s"]])
            teacher = ref.model.apply(v, batch["image_u_w"], mode="teacher")
        _, state = ref.model.apply(v, x, mode="train", teacher_logits=teacher,
                                   use_memory=resolved.allspark,
                                   mutable=["intermediates"] + [k for k in v if k != "params"])
        sown = flax.traverse_util.flatten_dict(state["intermediates"])
        masks = [value[0] for path, value in sown.items() if path[-1] == "kinks"]  # sow: tuples
        if len(masks) != 1:
            raise RuntimeError("expected one training-mode BatchNorm (the head's), "
                               f"found {len(masks)}")
        return masks[0]

    with nn.intercept_methods(_kink_interceptor(tau_fraction)):
        return np.asarray(jax.jit(forward)(variables))


def train_setup(ref: Reference):
    """The optimizer, its learning-rate schedules and the train config of the README's protocol."""
    m = ref.meta
    optim = ml_collections.ConfigDict(dict(name="sgd", lr=m["lr"], lr_multi=m["lr_multi"],
                                           momentum=m["momentum"], weight_decay=m["weight_decay"],
                                           poly_power=0.9))
    tcfg = default.get_config().train  # the release's values but for the protocol's below
    tcfg.update(loss_x="ce", loss_groups=1, ema_decay=0.0, conf_thresh=0.0,
                loss_u_ignore_padding=False, key_group_size=None)
    tx, schedules = optimizer.create_optimizer(optim, m["total_iters"])
    return tx, schedules, tcfg


def release_method(name: str) -> method_lib.Method:
    """The release's trainer `name` as recorded: the online teacher, the student on the weak view,
    no CutMix."""
    return method_lib.resolve(name, teacher="online", student_view="weak", cutmix_prob=0.0)


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


# The step sequences a file may hold: (prefix, method, {our loss name: its recorded name}).
STEP_CASES = (
    ("train_step", "allspark", {"loss_x": "loss_x", "loss_u": "loss_u"}),  # train_allspark.py
    ("semi_step", "semi", {"loss_x": "loss_x", "loss_u": "loss_u"}),  # train_baseline_semi.py
    ("sup_step", "supervised", {"loss_x": "loss"}),  # train_baseline_sup.py
)


def case_train_steps(ref: Reference) -> list[Result]:
    results = []
    for prefix, method, loss_names in STEP_CASES:
        if f"{prefix}/lrs" in ref.data:
            results += step_sequence_case(ref, prefix, method, loss_names)
    return results


def step_sequence_case(ref: Reference, prefix: str, method: str,
                       loss_names: dict[str, str]) -> list[Result]:
    """The recorded steps of `method` from state0 (README protocol): learning rates, losses,
    pseudo-labels, step 0's gradients and the state after every step (those the file holds)."""
    ref = ref.for_method(release_method(method))
    lrs = ref.data[f"{prefix}/lrs"]
    steps = lrs.shape[0]
    tx, schedules, tcfg = train_setup(ref)
    ours_lrs = np.array([[schedules["encoder"](t), schedules["rest"](t)] for t in range(steps)])
    results = [compare(f"{prefix} lrs", {"lrs": (ours_lrs, lrs)}, FORWARD_RTOL)]

    state = state_lib.create_train_state(ref.model, tx, jax.random.key(0), ref.x_l.shape[1], ema=False,
                                         variables=jax.tree.map(jnp.copy, ref.variables))
    step = train_step.make_train_step(ref.model, tx, tcfg, use_memory=True, with_outputs=True,
                                      method=release_method(method))
    batches = reference_batches(ref, steps)
    for t, batch in enumerate(batches):
        before = ref.to_state_dict(state.variables())
        ref_before = ref.state0 if t == 0 else ref.prefixed(f"{prefix}/state{t}/")
        if t == 0:
            grad_state = jax.tree.map(jnp.copy, state)
        state, out = step(state, batch)
        r = compare(f"{prefix} {t} losses",
                    {ours: (out[ours], ref.data[f"{prefix}/{theirs}{t}"])
                     for ours, theirs in loss_names.items()},
                    FORWARD_RTOL if t == 0 else TRAINED_RTOL)  # step 0 runs on the recorded state
        if f"{prefix}/pseudo_label{t}" in ref.data:
            agree = float(np.mean(np.asarray(out["pseudo_label"])
                                  == ref.data[f"{prefix}/pseudo_label{t}"]))
            r.note = f"pseudo-labels agree on {agree:.4%} of pixels"
            r.ok &= agree >= PSEUDO_LABEL_AGREEMENT
        results.append(r)
        if t == 0 and ref.has(f"{prefix}/grads0/"):
            results.append(grads_case(ref, out["grads"], grad_state, batch, tx, tcfg,
                                      prefix=prefix, method=method))
        if ref.has(f"{prefix}/state{t + 1}/"):
            sd = ref.to_state_dict(state.variables())
            refs = ref.prefixed(f"{prefix}/state{t + 1}/")
            r = compare(f"{prefix} state{t + 1}", {k: (sd[k], v) for k, v in refs.items()},
                        TRAINED_RTOL)
            mem_key = next((k for k in refs if k.endswith("kv_queue")), None)
            if mem_key:
                same, note = memory_rows_note(sd[mem_key], refs[mem_key], before[mem_key],
                                              ref_before[mem_key])
                r.ok &= same
                r.note = note
            results.append(r)
    return results


def grads_case(ref, grads, state, batch, tx, tcfg, *, kink_fraction: float = KINK_FRACTION,
               max_flips: int = MAX_KINK_FLIPS, prefix: str = "train_step",
               method: str = "allspark") -> Result:
    """grads0, with two float32 facts accounted for (and reported):

    * a gradient that is zero in exact arithmetic (a bias feeding a batch-statistics BN) is
      recorded as round-off; such tensors (norm below GRAD_FLOOR x the whole gradient's) must be
      round-off on our side too: ||out|| and ||out - ref|| below that floor;
    * ReLU inputs within float32 noise of 0 may take the other branch (see the module docstring):
      when the plain comparison fails, and only if 1 to `max_flips` inputs lie within
      `kink_fraction` x RMS of 0, those are flipped, the step recomputed and compared again; a
      pass then carries `fallback` (status `ok*`) naming the flipped positions.
    """
    refs = ref.prefixed(f"{prefix}/grads0/")
    floor = GRAD_FLOOR * float(np.sqrt(sum(np.sum(np.square(v, dtype=np.float64))
                                           for v in refs.values())))
    zeros = sorted(k for k, v in refs.items() if np.linalg.norm(v) < floor)

    def check(grads, note):
        ours = ref.to_state_dict({"params": grads})
        r = compare(f"{prefix} grads0", {k: (ours[k], v) for k, v in refs.items()
                                          if k not in zeros}, TRAINED_RTOL, note)
        zeros_ok = all(max(np.linalg.norm(ours[k]), np.linalg.norm(ours[k] - refs[k])) < floor
                       for k in zeros)
        r.ok &= zeros_ok
        if zeros:
            r.note = "; ".join(filter(None, (r.note, (
                f"{len(zeros)} round-off-only tensor(s) (< {floor:.1e}) "
                f"{'are round-off here too' if zeros_ok else 'ARE NOT ZERO HERE'}: {', '.join(zeros)}"))))
        return r

    plain = check(grads, "")
    if plain.ok or "NON-FINITE" in plain.note:
        return plain
    mask = kink_positions(ref, state.variables(), batch, kink_fraction, method)
    count = int(mask.sum())
    within = f"ReLU input(s) within {kink_fraction:g} x RMS of 0"
    if not 1 <= count <= max_flips:
        plain.note = "; ".join(filter(None, (
            f"no fallback: {count} {within}"
            + (f", more than the {max_flips} that round-off can explain" if count else ""),
            plain.note)))
        return plain
    # positions in the release's layout: (image, channel, y, x) of the head's BN output
    where = ", ".join(f"[{n}, {c}, {y}, {x}]" for n, y, x, c in np.argwhere(mask))
    with nn.intercept_methods(_kink_interceptor(kink_fraction, flip=mask)):
        _, out = jax.jit(lambda s, b: train_step.train_step(
            s, b, model=ref.model, tx=tx, train_config=tcfg, use_memory=True,
            method=release_method(method)))(state, batch)
    result = check(out["grads"], f"plain comparison: max rel {plain.max_rel:.2e}")
    if result.ok:
        result.fallback = f"{count} {within} given the other branch, at (n, c, y, x) {where}"
    else:
        result.note = (f"{count} {within} flipped at (n, c, y, x) {where}, still failing; "
                       + result.note)
    return result


CASES = (case_encoder, case_eval_single, case_train_forward, case_losses, case_miou,
         case_train_steps)
# What each case looks for in a file (a file with none of them verifies nothing and fails).
CASE_KEYS = ("encoder_eval/", "encoder_eval_u/", "eval_single/logits", "train_forward_nomem/",
             "train_forward_mem/", "loss/logits", "miou/pred") + tuple(
                 f"{prefix}/lrs" for prefix, _, _ in STEP_CASES)


def verify(path: str, print_fn=print) -> list[Result]:
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(str(f["meta_json"])) if "meta_json" in f.files else {}
        if verify_dpt.is_dpt_recording(meta):  # UniMatch V2's DPT recordings
            return verify_dpt.verify(path, {k: f[k] for k in f.files}, meta, print_fn)
        if verify_unimatch_v2.is_unimatch_v2_recording(meta):  # UniMatch V2's trainer
            return verify_unimatch_v2.verify(path, {k: f[k] for k in f.files}, meta, print_fn)
    ref = Reference(path)
    described = ("encoder", "backbone", "embed_dims", "depths", "num_classes")
    print_fn(f"{path}: {json.dumps({k: ref.meta[k] for k in described if k in ref.meta})}, "
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
    parser.add_argument("--precision", choices=PRECISIONS, default="highest",
                        help="JAX's precision of float32 matrix products and convolutions "
                        "(model.precision); the tolerances were set at 'highest' (full float32)")
    args = parser.parse_args(argv)
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), precision "
          f"{args.precision}, jax {jax.__version__}")
    failed = False
    for path in args.files:
        try:
            with jax.default_matmul_precision(args.precision):
                results = verify(path)
        except (OSError, ReferenceFileError) as e:
            print(f"FAIL {path}: cannot verify: {e}")
            failed = True
            continue
        if not results:
            print(f"FAIL {path}: no cases: the file holds none of {', '.join(CASE_KEYS)}")
            failed = True
            continue
        bad = [r.name for r in results if not r.ok]
        starred = [r.name for r in results if r.ok and r.fallback]
        failed |= bool(bad)
        print(f"{path}: {len(results) - len(bad)} cases ok"
              + (f" ({len(starred)} only through the ReLU-kink fallback: {', '.join(starred)})"
                 if starred else "")
              + f", {len(bad)} failed" + (f" ({', '.join(bad)})" if bad else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
