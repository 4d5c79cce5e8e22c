"""Checks UniMatch V2's training iteration (`train_step.unimatch_v2_step`, the AdamW of
`allspark_jax.optimizer`, the EMA teacher's schedule) against UniMatch V2's own trainer.

    python -m allspark_jax.tools.verify_reference tests/data/unimatch_v2_tiny.npz

(`verify_reference` hands a file whose `meta_json` "method" is "unimatch_v2" here.)
tests/data/record_unimatch_v2.py runs `unimatch_v2.py`'s `main()`, unchanged, for a few iterations
on a tiny perturbed DINOv2 + DPT with fixed batches and complementary-dropout draws, and records the
initial state and, per step, the batch, the dropout scale, the learning rates and EMA ratio, the
teacher's logits and pseudo-labels, the losses, (step 0) the gradients, and the student, the EMA
teacher and AdamW's moments after the step (its docstring gives the layout).

Our jitted step runs the recorded batches with the recorded dropout scale (`feature_scale`), each
step from OUR previous state, never re-seeded from the record, so that a wrong piece compounds as it
would in a run. Cases per step t:
  step{t} schedule   the learning rates [encoder, rest] of our optimiser's schedules at step t (the
                     poly schedule with its one-step lag) and our EMA decay after it, against the
                     trainer's param-group rates and `ema_ratio`;
  step{t} losses     loss, loss_x, loss_u (its loss_s), loss_s1, loss_s2, mask_ratio and the EMA
                     teacher's logits on the weak view; the note gives the pseudo-labels'
                     agreement (the weak view's argmax; each strong view's CutMix-mixed target,
                     255 where not confident or padding), which must reach PSEUDO_LABEL_AGREEMENT;
  step{t} grads      the gradients (the steps whose gradients the file holds: step 0);
  step{t} update     each parameter's change over the step, new - old, of the student and of the
                     EMA teacher. A step moves a weight by about the learning rate, a small
                     fraction of itself, so the state comparison cannot see a wrong learning rate,
                     weight decay or EMA decay; this one does;
  step{t} state      the student, the EMA teacher, AdamW's moments (torch's per-parameter exp_avg /
                     exp_avg_sq against optax's ScaleByAdamState mu / nu, in the state dict's names
                     and layouts) and step count after the step; the parameters the forward never
                     applies (`optimizer.NEVER_APPLIED`) bit for bit unchanged and without
                     moments, as the trainer's AdamW leaves them (no gradient, no state, no decay).

Tolerances (`comparison`): step 0's losses and teacher logits (the recorded state's forward) and the
schedules at FORWARD_RTOL, everything after an update at TRAINED_RTOL, pseudo-labels at
PSEUDO_LABEL_AGREEMENT. Three float32 facts are accounted for, each where it is defined below:
gradient entries that are zero in exact arithmetic give Adam updates of round-off's sign
(`ROUNDOFF_GRAD`: left out of the update and state cases once ours are round-off too); a change
new - old is known only to the float32 rounding of the stored states (`UPDATE_ULPS`); the first
moment of a gradient that changes sign is a cancelling sum, measured against its gradients' RMS
(`_moment_pairs`).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from allspark_jax import optimizer, train_step
from allspark_jax import method as method_lib
from allspark_jax.configs import default
from allspark_jax import state as state_lib
from allspark_jax.errors import ReferenceFileError
from allspark_jax.models.dinov2 import DINOv2Config
from allspark_jax.models.dpt import DPTConfig
from allspark_jax.models.segmentor import dpt_model, init_variables
from allspark_jax.tools.comparison import (FORWARD_RTOL, PSEUDO_LABEL_AGREEMENT, TRAINED_RTOL,
                                           Result, compare, nhwc)
from allspark_jax.weights import dinov2 as dinov2_weights

METHOD = "unimatch_v2"
IGNORE = 255
# What every recorded step holds (record_unimatch_v2.py's keys; "x/": a state dict under x/).
STEP_KEYS = ("img_x", "mask_x", "img_u_w", "img_u_s1", "img_u_s2", "ignore_mask", "cutmix_box1",
             "cutmix_box2", "comp_drop_scale", "lr", "ema_ratio", "teacher_logits", "conf_u_w",
             "pseudo_label", "pseudo_label_mixed1", "ignore_mask_mixed1", "pseudo_label_mixed2",
             "ignore_mask_mixed2", "loss", "loss_x", "loss_s", "loss_s1", "loss_s2", "mask_ratio",
             "after/student/", "after/ema/", "after/adam_exp_avg/", "after/adam_exp_avg_sq/")


def is_unimatch_v2_recording(meta: dict) -> bool:
    """Whether a recording's `meta_json` is record_unimatch_v2.py's (UniMatch V2's trainer)."""
    return meta.get("method") == METHOD and "trainer" in meta


def _tuples(fields: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


class Recording:
    """The file's arrays, its model and the optimiser / train config its trainer ran with."""

    def __init__(self, path: str, data: dict, meta: dict):
        self.path, self.data, self.meta = path, data, meta
        try:
            encoder = DINOv2Config(**_tuples(meta["backbone"]))
            head = DPTConfig(num_classes=meta["num_classes"], **_tuples(meta["dpt"]))
            self.steps, self.crop = int(meta["steps"]), int(meta["crop_size"])
            adamw = meta["adamw"]
            criterion = meta["yaml"]["criterion"]
        except (KeyError, TypeError, ValueError) as e:
            raise ReferenceFileError(f"{path}: meta_json does not describe a UniMatch V2 run: "
                                     f"{type(e).__name__} {e}") from e
        if criterion.get("name") != "CELoss" or criterion.get("kwargs", {}).get(
                "ignore_index", IGNORE) != IGNORE:
            raise ReferenceFileError(f"{path}: meta_json yaml criterion {criterion}; expected "
                                     f"CELoss with ignore_index {IGNORE} (train.loss_x 'ce')")
        if float(adamw["eps"]) != optimizer.ADAMW_EPS:
            raise ReferenceFileError(f"{path}: meta_json adamw eps {adamw['eps']}; this port's "
                                     f"AdamW uses {optimizer.ADAMW_EPS}")
        prefixes = {k.rsplit("/", 1)[0] + "/" for k in data if "/" in k}
        missing = [k for k in ["state0/"] + [f"step{t}/{n}" for t in range(self.steps)
                                             for n in STEP_KEYS]
                   if k not in data and k not in prefixes]
        if missing:
            raise ReferenceFileError(f"{path}: not a UniMatch V2 recording: it lacks "
                                     f"{', '.join(missing)}")
        self.model = dpt_model(encoder, head)
        self.optim = ml_collections.ConfigDict(dict(
            name="adamw", lr=meta["lr"], lr_multi=meta["lr_multi"],
            betas=tuple(adamw["betas"]), weight_decay=adamw["weight_decay"],
            poly_power=meta["poly_power"], momentum=0.9))  # momentum: SGD's, unread by adamw
        self.train = default.get_config().train  # the defaults but for the recording's below
        self.train.update(loss_x="ce", loss_groups=1, ema_decay=meta["ema_decay_max"],
                          conf_thresh=meta["conf_thresh"], loss_u_ignore_padding=True,
                          key_group_size=None)
        self.method = method_lib.resolve(METHOD, teacher="ema", student_view="strong",
                                         cutmix_prob=0.5)
        template = jax.eval_shape(lambda: init_variables(self.model, jax.random.key(0),
                                                         self.crop))
        self.state0 = self.prefixed("state0/")
        self.variables = dinov2_weights.segmentor_from_state_dict(
            self.state0, template, source=f"{path}: state0")
        self.no_grad = list(meta.get("no_grad_params", []))

    def prefixed(self, prefix: str) -> dict[str, np.ndarray]:
        return {k[len(prefix):]: v for k, v in self.data.items() if k.startswith(prefix)}

    def has(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.data)

    def batch(self, t: int) -> dict:
        """Step t's batch in this port's layout (NHWC; pad_u and the boxes bool), with the
        trainer's complementary-dropout scale as `feature_scale`."""
        d = lambda k: self.data[f"step{t}/{k}"]  # noqa: E731
        return {"image_l": nhwc(d("img_x")), "mask_l": d("mask_x").astype(np.int32),
                "image_u_w": nhwc(d("img_u_w")), "image_u_s1": nhwc(d("img_u_s1")),
                "image_u_s2": nhwc(d("img_u_s2")), "pad_u": d("ignore_mask") == IGNORE,
                "cutmix_u1": d("cutmix_box1") == 1, "cutmix_u2": d("cutmix_box2") == 1,
                "feature_scale": d("comp_drop_scale")}

    def mixed_targets(self, t: int) -> np.ndarray:
        """(2B, S, S) the trainer's target of each strong view: `mask_u_w_cutmixed{v}` where
        `conf_u_w_cutmixed{v}` >= conf_thresh and `ignore_mask_cutmixed{v}` != 255, else 255.

        The file holds the mixed labels and ignore masks but not the mixed confidence; the
        trainer mixes all three alike (inside box v image i takes image B-1-i's values, its
        `flip(0)`), so the recorded confidence is mixed so here, after checking that this
        reproduces the recorded mixed labels and ignore masks exactly."""
        d = lambda k: self.data[f"step{t}/{k}"]  # noqa: E731
        out = []
        for v in (1, 2):
            box = d(f"cutmix_box{v}") == 1
            mix = lambda a: np.where(box, a[::-1], a)  # noqa: E731
            label, ignore = d(f"pseudo_label_mixed{v}"), d(f"ignore_mask_mixed{v}")
            if not (np.array_equal(mix(d("pseudo_label")), label)
                    and np.array_equal(mix(d("ignore_mask")), ignore)):
                raise ReferenceFileError(f"{self.path}: step{t}/pseudo_label_mixed{v} / "
                                         f"ignore_mask_mixed{v} are not step{t}/pseudo_label / "
                                         f"ignore_mask mixed with the flipped batch in "
                                         f"cutmix_box{v}")
            keep = (mix(d("conf_u_w")) >= self.train.conf_thresh) & (ignore != IGNORE)
            out.append(np.where(keep, label, IGNORE))
        return np.concatenate(out)


# A gradient entry below this fraction of the whole gradient's norm is zero in exact arithmetic
# and float32 round-off. On the shipped file those are the 32 attention key biases (a softmax does
# not change when a query's scores shift together, so d loss / d b_k = 0): the trainer's RMS of
# them over the steps so far is <= 1.1e-9 of the whole, while the smallest real entry's is 3.7e-7
# (entries that are exactly 0, a dead channel's, are not round-off: both sides give 0 and the
# update is the weight decay alone). Adam divides an entry by its own RMS + eps (1e-8): a
# round-off entry's update, up to ~10% of the learning rate here, has the sign and size of the
# round-off, which two implementations do not share, so the update and state cases leave these
# entries out, after checking that ours are round-off too. 1e-8 lies a factor >= 9 above the
# round-off and >= 37 below the smallest real entry.
ROUNDOFF_GRAD = 1e-8

# The recorded states are float32, so a step's change new - old is known only to the rounding of
# the stored values: per entry, in ulps of the value (float32 spacing at the larger of its
# magnitudes). The student: ours rounds p + u once (<= 0.5 ulp), the trainer's AdamW twice,
# p * (1 - lr wd) then p - lr m / (sqrt(v) + eps) (<= 1). The EMA teacher: each side's
# e d + p (1 - d) rounds three times (<= 1.5 ulp each), plus (1 - d) <= 1/2 of its inputs' own
# rounding (after step 0, whose EMA is the student exactly). The worst needed on the shipped file
# is 1 ulp (student) and 2 ulps (EMA); the gamma of a layer scale (~1.0, 1 ulp 1.2e-7) changes by
# ~1e-4 a step, so without the allowance one ulp is already 1e-3 of its change.
UPDATE_ULPS = {"student": 1.5, "ema": 4.0}


def roundoff_entries(rec: Recording, t: int) -> dict[str, np.ndarray]:
    """name -> bool mask of the entries whose update at step t is decided by round-off: the
    trainer's gradient RMS so far, sqrt(bias-corrected exp_avg_sq), is nonzero and below
    ROUNDOFF_GRAD x the norm of that RMS over every entry (at step 0: |g| and ||g||)."""
    b2 = float(rec.meta["adamw"]["betas"][1])
    nu = rec.prefixed(f"step{t}/after/adam_exp_avg_sq/")
    rms = {k: np.sqrt(v.astype(np.float64) / (1 - b2 ** (t + 1))) for k, v in nu.items()}
    floor = ROUNDOFF_GRAD * float(np.sqrt(sum(np.sum(np.square(v)) for v in rms.values())))
    return {k: (v > 0) & (v < floor) for k, v in rms.items()}


def _without(pairs: dict[str, tuple], skip: dict[str, np.ndarray]) -> dict[str, tuple]:
    """The pairs less the skipped entries (a tensor with any skipped is flattened)."""
    out = {}
    for k, (ours, ref) in pairs.items():
        m = skip.get(k)
        ours, ref = np.asarray(ours), np.asarray(ref)
        out[k] = (ours, ref) if m is None or not m.any() else (ours[~m], ref[~m])
    return out


def _adam_state(opt_state) -> optax.ScaleByAdamState:
    found = [s for s in jax.tree.leaves(
        opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)]
    if len(found) != 1:
        raise RuntimeError(f"expected one ScaleByAdamState in the optimizer state, found "
                           f"{len(found)}")
    return found[0]


def _state_dict(params) -> dict[str, np.ndarray]:
    return dinov2_weights.segmentor_to_state_dict({"params": params})


def _snapshot(state) -> dict:
    """The state's student, EMA teacher and Adam moments and count as torch-named numpy state
    dicts (the jitted step donates the state's buffers, so they are copied out first)."""
    adam = _adam_state(state.opt_state)
    return {"student": _state_dict(state.params), "ema": _state_dict(state.ema_params),
            "mu": _state_dict(adam.mu), "nu": _state_dict(adam.nu), "count": int(adam.count)}


def _recorded(rec: Recording, t: int) -> dict:
    """The trainer's states after step t (t = -1: the initial student = EMA teacher)."""
    if t < 0:
        return {"student": rec.state0, "ema": rec.state0}
    p = f"step{t}/after/"
    return {"student": rec.prefixed(p + "student/"), "ema": rec.prefixed(p + "ema/"),
            "mu": rec.prefixed(p + "adam_exp_avg/"), "nu": rec.prefixed(p + "adam_exp_avg_sq/")}


def verify(path: str, data: dict, meta: dict, print_fn: Callable = print, *,
           steps: int | None = None) -> list[Result]:
    """The cases of a UniMatch V2 trainer recording (module docstring), printed. `steps`: only the
    first so many recorded steps (all by default)."""
    rec = Recording(path, data, meta)
    steps = rec.steps if steps is None else min(steps, rec.steps)
    print_fn(f"{path}: UniMatch V2's trainer ({meta.get('trainer', '?')}), {steps} of "
             f"{rec.steps} steps, DINOv2 width {meta['backbone']['embed_dim']} depth "
             f"{meta['backbone']['depth']} + DPT, image {rec.crop}x{rec.crop}, batch "
             f"{meta['batch_size']}")
    tx, schedules = optimizer.create_optimizer(rec.optim, int(meta["total_iters"]))
    state = state_lib.create_train_state(rec.model, tx, jax.random.key(0), rec.crop, ema=True,
                                         variables=jax.tree.map(jnp.asarray, rec.variables))
    # The trainer's EMA teacher starts as a deep copy of the student: the file's state0.
    state = state.replace(ema_params=jax.tree.map(jnp.asarray, rec.variables["params"]))
    step = train_step.make_train_step(rec.model, tx, rec.train, use_memory=False,
                                      method=rec.method, with_outputs=True)
    results = []
    before = _snapshot(state)
    for t in range(steps):
        results.append(_schedule_case(rec, t, schedules))
        state, out = step(state, rec.batch(t))
        after = _snapshot(state)
        results.append(_losses_case(rec, t, out))
        if rec.has(f"step{t}/grads/"):
            results.append(_grads_case(rec, t, out["grads"]))
        skip = roundoff_entries(rec, t)
        results.append(_update_case(rec, t, before, after, skip, _state_dict(out["grads"])))
        results.append(_state_case(rec, t, after, skip, state.params))
        before = after
    for r in results:
        print_fn(r.line())
    return results


def _schedule_case(rec: Recording, t: int, schedules: dict) -> Result:
    ours = np.array([schedules["encoder"](t), schedules["rest"](t)], np.float64)
    decay = float(train_step.ema_decay(jnp.asarray(t, jnp.int32), rec.method, rec.train))
    return compare(f"step{t} schedule",
                   {"lr": (ours, rec.data[f"step{t}/lr"]),
                    "ema_decay": (np.float64(decay), rec.data[f"step{t}/ema_ratio"])},
                   FORWARD_RTOL)


def _losses_case(rec: Recording, t: int, out: dict) -> Result:
    d = lambda k: rec.data[f"step{t}/{k}"]  # noqa: E731
    pairs = {k: (out[k], d(theirs)) for k, theirs in (
        ("loss", "loss"), ("loss_x", "loss_x"), ("loss_u", "loss_s"), ("loss_s1", "loss_s1"),
        ("loss_s2", "loss_s2"), ("mask_ratio", "mask_ratio"))}
    pairs["teacher_logits"] = (out["teacher_logits"], nhwc(d("teacher_logits")))
    # Step 0 runs on the recorded state (a forward computation); later steps on our own.
    r = compare(f"step{t} losses", pairs, FORWARD_RTOL if t == 0 else TRAINED_RTOL)
    weak = float(np.mean(np.argmax(np.asarray(out["teacher_logits"]), axis=-1)
                         == d("pseudo_label")))
    targets = rec.mixed_targets(t)
    mixed = float(np.mean(np.asarray(out["pseudo_label"]) == targets))
    r.note = (f"pseudo-labels agree on {weak:.4%} (weak view), targets on {mixed:.4%} (both "
              f"mixed views, {int(np.sum(targets != IGNORE))} pixels learned)")
    r.ok &= min(weak, mixed) >= PSEUDO_LABEL_AGREEMENT
    return r


def _grads_case(rec: Recording, t: int, grads) -> Result:
    refs = rec.prefixed(f"step{t}/grads/")
    ours = _state_dict(grads)
    # Plain: the round-off entries (ROUNDOFF_GRAD) weigh nothing in their tensors' norms.
    return compare(f"step{t} grads", {k: (ours[k], v) for k, v in refs.items()}, TRAINED_RTOL)


def _ulps(*values) -> np.ndarray:
    return np.max([np.spacing(np.abs(np.asarray(v, np.float32))) for v in values], axis=0)


def _update_case(rec, t, before, after, skip, grads) -> Result:
    """Each parameter's change over step t, ours against the trainer's, less the float32 storage's
    share of the difference (UPDATE_ULPS) and the round-off entries (ROUNDOFF_GRAD)."""
    ref_before, ref_after = _recorded(rec, t - 1), _recorded(rec, t)
    pairs = {}
    for which, ulps in UPDATE_ULPS.items():
        for k, ref in ref_after[which].items():
            ours = after[which][k].astype(np.float64) - before[which][k]
            theirs = ref.astype(np.float64) - ref_before[which][k]
            diff = ours - theirs
            allowed = ulps * _ulps(after[which][k], before[which][k], ref, ref_before[which][k])
            excess = np.sign(diff) * np.maximum(np.abs(diff) - allowed, 0.0)
            pairs[f"{which} {k}"] = (theirs + excess, theirs)
    r = compare(f"step{t} update", _without(pairs, {f"{w} {k}": m for w in UPDATE_ULPS
                                                    for k, m in skip.items()}), TRAINED_RTOL)
    # Ours must be round-off where the trainer's are, else leaving them out would hide a gradient.
    n = int(sum(m.sum() for m in skip.values()))
    if n:
        norm = float(np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in grads.values())))
        worst = max(float(np.max(np.abs(grads[k][m]))) for k, m in skip.items() if m.any()) / norm
        ok = worst < ROUNDOFF_GRAD
        r.ok &= ok
        r.note = (f"{n} round-off gradient entries left out, ours there <= {worst:.1e} of the "
                  f"gradient's norm" + ("" if ok else f", NOT ROUND-OFF (< {ROUNDOFF_GRAD:g})"))
    return r


def _moment_pairs(rec, t, mu, ref_mu, ref_nu) -> dict[str, tuple]:
    """AdamW's first moments as pairs whose relative error is ||mu - mu_ref|| over the norm of
    (1 - b1^(t+1)) x sqrt(bias-corrected nu_ref), per tensor.

    mu sums the steps' gradients with their signs; where they flip between steps it is far
    smaller than they are (on the shipped file a bias whose mu after step 2 is 1/10 of its
    gradients, 0.81 g0 + 0.9 g1 + g2 cancelling), and its relative error is theirs times that
    ratio. Measured against what it would be had they one sign, (1 - b1^(t+1)) x their RMS, the
    error is that of Adam's step direction m_hat / sqrt(v_hat) and of the gradients themselves."""
    b1, b2 = (float(b) for b in rec.meta["adamw"]["betas"])
    pairs = {}
    for k, ref in ref_mu.items():
        scale = (1 - b1 ** (t + 1)) * np.sqrt(ref_nu[k].astype(np.float64) / (1 - b2 ** (t + 1)))
        pairs[f"mu {k}"] = (scale + (mu[k].astype(np.float64) - ref), scale)
    return pairs


def _state_case(rec, t, after, skip, params) -> Result:
    ref_after = _recorded(rec, t)
    pairs = {f"{which} {k}": (after[which][k], ref)
             for which in ("student", "ema", "nu") for k, ref in ref_after[which].items()}
    pairs.update(_moment_pairs(rec, t, after["mu"], ref_after["mu"], ref_after["nu"]))
    count = rec.data.get(f"step{t}/after/adam_step")
    if count is not None:
        pairs["adam step count"] = (np.int64(after["count"]), np.int64(count))
    keyed_skip = {f"{w} {k}": m for w in ("student", "ema", "mu", "nu") for k, m in skip.items()}
    r = compare(f"step{t} state", _without(pairs, keyed_skip), TRAINED_RTOL)
    plain_mu = compare("mu", _without({f"mu {k}": (after["mu"][k], v)
                                       for k, v in ref_after["mu"].items()}, keyed_skip), 1.0)
    # The parameters without a gradient (the trainer's list): those our optimiser leaves out of
    # the weight decay (`optimizer.NEVER_APPLIED`), bit for bit unchanged on both sides, and
    # without moments (the trainer's AdamW holds no state for them; ours zeros).
    decayed = jax.tree.map(lambda on, p: np.full(p.shape, on), optimizer.decayed(params), params)
    ours = sorted(k for k, on in _state_dict(decayed).items() if not on.all())
    frozen = sorted(rec.no_grad)
    moved = [k for k in frozen if k not in rec.state0
             or not np.array_equal(after["student"][k], rec.state0[k])
             or not np.array_equal(ref_after["student"][k], rec.state0[k])
             or np.any(after["mu"][k]) or np.any(after["nu"][k]) or k in ref_after["mu"]]
    r.ok &= ours == frozen and not moved
    r.note = (f"exp_avg against its gradients' RMS (to itself {plain_mu.max_rel:.1e}); "
              f"{len(frozen)} parameters without a gradient "
              + ("unchanged, without moments" if not moved else "CHANGED: " + ", ".join(moved))
              + ("" if ours == frozen else f"; OUR NEVER_APPLIED differs: {', '.join(ours)}"))
    return r
