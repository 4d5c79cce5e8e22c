"""A validation set through a Predictor: mIoU over every process's images, and its table.

`evaluate` is the loop (images dealt round-robin to the local devices, counts summed over
processes); `evaluate_variables` / `evaluate_state` run it on the configured validation set (the EMA
teacher too when there is one); `make_predictor` builds the Predictor of `config.eval`. The
`--mode eval` command is `allspark_jax.commands.evaluate`.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from allspark_jax.evaluation import metrics
from allspark_jax.evaluation.predictor import Predictor, eval_crop_size
from allspark_jax.models.segmentor import build_model
from allspark_jax.sharding import to_host


def _progress(total, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, leave=False)


def evaluate(predictor: Predictor, variables, examples, num_classes: int, *,
             class_names=None, num_images: int | None = None, progress: bool = False,
             desc: str = "eval") -> dict:
    """mIoU of `variables` over `examples` (this process's share), summed over all processes.

    Args:
      predictor: a `Predictor` (mode, crop, buckets, batch).
      variables: model variables (params, batch_stats[, memory]); host numpy or jax arrays (global
        arrays of a training state included). They are replicated on the predictor's devices.
      examples: iterable of dicts with 'image' (H, W, 3) float32 normalised and 'mask' (H, W) int.
      num_classes: K.
      class_names: names for the per-class table (default: class_0 ...).
      num_images: this process's image count (for the progress bar), if known.
    Returns:
      {'miou': float, 'iou': {name: float}, 'num_images': int (all processes), 'mode': str}.
    """
    counts = np.zeros((3, num_classes), np.int64)
    bar = _progress(num_images, progress, desc)
    n = 0

    def prepared():
        for ex in examples:
            image, mask = predictor.prepare(np.asarray(ex["image"]), np.asarray(ex["mask"]))
            yield mask, image

    for mask, pred in predictor.predict_stream(to_host(variables), prepared()):
        counts += np.stack(metrics.intersection_and_union(pred, mask, num_classes))
        n += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if jax.process_count() > 1:
        gathered = multihost_utils.process_allgather(
            np.concatenate([counts.reshape(-1), [n]]).astype(np.int64))
        gathered = np.asarray(gathered).reshape(jax.process_count(), -1).sum(0)
        counts, n = gathered[:-1].reshape(3, num_classes), int(gathered[-1])
    mean, iou = metrics.miou(counts[0], counts[1])
    names = list(class_names) if class_names is not None else [f"class_{k}" for k in
                                                                range(num_classes)]
    return {"miou": mean, "iou": {name: float(v) for name, v in zip(names, iou)},
            "num_images": int(n), "mode": predictor.mode}


def format_iou_table(result: dict, title: str = "") -> str:
    """A per-class IoU table (text) with the mean at the bottom."""
    names = list(result["iou"])
    width = max([len(s) for s in names] + [8])
    lines = [title] if title else []
    lines += [f"{'class':<{width}}  IoU (%)", "-" * (width + 9)]
    lines += [f"{name:<{width}}  {v:7.2f}" for name, v in result["iou"].items()]
    lines += ["-" * (width + 9), f"{'mIoU':<{width}}  {result['miou']:7.2f}"]
    return "\n".join(lines)


def make_predictor(config, model=None) -> Predictor:
    """The Predictor of `config.eval` for `model` (default: the model of `config`)."""
    model = model if model is not None else build_model(config)
    return Predictor(model, config.eval.mode, eval_crop_size(config),
                     buckets=config.eval.buckets, batch_size=config.eval.batch_size)


def evaluate_variables(config, opts, predictor: Predictor, variables, *, desc: str = "eval") -> dict:
    """mIoU of one set of variables on the validation set of `opts` (every process calls it)."""
    # tf.data: imported where a validation set is read, so that `evaluate` runs without TensorFlow.
    from allspark_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
    examples, count = input_pipeline.create_val_iterator(
        opts, process_index=jax.process_index(), process_count=jax.process_count(),
        max_images=int(config.eval.max_images))
    return evaluate(
        predictor, variables, examples, opts.num_classes, class_names=opts.class_names,
        progress=bool(config.eval.progress_bar) and jax.process_index() == 0,
        desc=desc, num_images=count)


def evaluate_state(config, opts, predictor: Predictor, state) -> dict:
    """{'student': result[, 'ema': result]}: the EMA teacher is evaluated too when there is one."""
    results = {"student": evaluate_variables(config, opts, predictor, state.variables(),
                                             desc="eval")}
    if state.ema_params is not None:
        results["ema"] = evaluate_variables(config, opts, predictor, state.variables(teacher=True),
                                            desc="eval (ema)")
    return results
