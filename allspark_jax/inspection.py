"""Looking inside data, predictions and the AllSpark module: the library side of `colabs/*.ipynb`.

Everything here is plain numpy / JAX (no plotting), so the notebooks only draw. Layouts are NHWC,
labels are int with 255 = ignore, images are ImageNet-normalised float32 as the pipelines give them.

Display:
  `denormalize(images)`                  normalised float -> uint8 RGB.
  `colorize(labels, palette)`            (..., H, W) labels -> (..., H, W, 3) uint8 colours.
Counting:
  `class_pixel_counts(masks, K)`         per-class pixel counts (+ ignored) of label maps.
  (confusion matrices: `allspark_jax.evaluation.metrics.confusion_matrix`)
Inference:
  `predict_images(config, variables, examples)`  per-image predictions with `config.eval.mode`.
AllSpark internals:
  `teacher_outputs(model, variables, images_u)`  the training step's teacher logits / pseudo-labels.
  `allspark_internals(model, variables, images_l, images_u, use_memory)`  one training-mode forward:
                                         channel classes, memory before / after, attention maps.
  `memory_summary(memory)`, `memory_change(before, after)`  per-class views of the Semantic Memory.
"""
from __future__ import annotations

import itertools
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from allspark_jax.data.datasets import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, voc_palette
from allspark_jax.evaluation import evaluator
from allspark_jax.evaluation.bucketing import inference_collections
from allspark_jax.models.segmentor import teacher_model


# ------------------------------------------------------------------------------------------- display


def denormalize(images) -> np.ndarray:
    """(..., H, W, 3) ImageNet-normalised float -> (..., H, W, 3) uint8 RGB (clipped)."""
    x = (np.asarray(images, np.float32) * np.asarray(IMAGENET_STD, np.float32)
         + np.asarray(IMAGENET_MEAN, np.float32))
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def colorize(labels, palette: np.ndarray | None = None) -> np.ndarray:
    """(..., H, W) int labels -> (..., H, W, 3) uint8 colours of `palette` ((256, 3) uint8).

    Default palette: VOC's (255 = ignore is drawn in VOC's off-white). Use
    `allspark_jax.data.datasets.palette(config.data.name)` for Cityscapes colours.
    """
    if palette is None:
        palette = voc_palette()
    labels = np.asarray(labels).astype(np.int64)
    return np.asarray(palette, np.uint8)[np.clip(labels, 0, 255)]


# ------------------------------------------------------------------------------------------ counting


def class_pixel_counts(masks: Iterable[Any] | np.ndarray, num_classes: int,
                       ignore_index: int = IGNORE_INDEX) -> dict[str, np.ndarray | int]:
    """Pixel counts per class over label maps.

    Args:
      masks: one int array of any shape (e.g. (B, H, W)) or an iterable of them (images of
        different sizes).
      num_classes: K.
    Returns:
      {'pixels': (K,) int64 pixels per class, 'images': (K,) int64 number of maps in which the class
      occurs (an array counts as one map per leading index when it is 3-D), 'ignored': int pixels equal
      to `ignore_index`, 'other': int pixels with any other out-of-range value (should be 0)}.
    """
    if isinstance(masks, np.ndarray) or hasattr(masks, "shape"):
        m = np.asarray(masks)
        masks = list(m) if m.ndim == 3 else [m]
    pixels = np.zeros(num_classes, np.int64)
    images = np.zeros(num_classes, np.int64)
    ignored = other = 0
    for m in masks:
        m = np.asarray(m).reshape(-1).astype(np.int64)
        ignored += int(np.sum(m == ignore_index))
        valid = (m >= 0) & (m < num_classes)
        other += int(np.sum(~valid & (m != ignore_index)))
        c = np.bincount(m[valid], minlength=num_classes)[:num_classes]
        pixels += c
        images += c > 0
    return {"pixels": pixels, "images": images, "ignored": ignored, "other": other}


# ----------------------------------------------------------------------------------------- inference


def predict_images(config, variables: Mapping, examples: Iterable[Mapping], *, model=None,
                   max_images: int | None = None) -> list[dict]:
    """Predicts validation examples as the evaluation does (`config.eval.mode`, bucketed batches).

    Args:
      config: the run's ConfigDict (model.*, eval.mode, eval.crop_size, data.crop_size are read).
      variables: {'params', 'batch_stats', ...} (the 'memory' collection is read by the branch
        "memory" alone, `model.inference_branch`; other collections are dropped).
      examples: dicts with 'image' (H, W, 3) normalised float32 and 'mask' (H, W) int (e.g.
        `input_pipeline.create_val_dataset(opts).as_numpy_iterator()`); 'name' is passed through.
      model: the Flax module; default `build_model(config)` (its branch `model.inference_branch`).
      max_images: stop after this many.
    Returns:
      one dict per image, in the order of `examples`: 'image' (h, w, 3) and 'mask' (h, w) as the
      model saw them (center_crop crops both), 'pred' (h, w) int32, 'name' (str or None).
    """
    predictor = evaluator.make_predictor(config, model)
    records = []
    for ex in itertools.islice(examples, max_images):
        image, mask = predictor.prepare(np.asarray(ex["image"]), np.asarray(ex["mask"]))
        name = ex.get("name")
        records.append({"image": image, "mask": mask,
                        "name": name.decode() if isinstance(name, bytes) else name})
    preds = predictor.predict(variables, [r["image"] for r in records])
    return [{**r, "pred": p} for r, p in zip(records, preds)]


# --------------------------------------------------------------------------------- AllSpark internals


def teacher_outputs(model, variables: Mapping, images_u, *, key_group_size: int | None = None,
                    branch: str = "labeled", use_memory: bool = False
                    ) -> tuple[jax.Array, jax.Array]:
    """The training step's teacher pass ("teacher" mode) on unlabeled (weak) images, through the
    AllSpark branch `branch` (`train.teacher_branch`) as the step takes it
    (`segmentor.teacher_model`).

    Args:
      images_u: (B, S, S, 3) normalised (S the training crop).
      use_memory: the step is past the warm-up (read only by the branch "memory", which then needs
        the 'memory' collection in `variables`).
    Returns:
      (logits (B, S, S, K) float32, pseudo_labels (B, S, S) int32 = argmax).
    """
    teacher = teacher_model(model, branch, use_memory)
    v = {k: variables[k] for k in inference_collections(teacher) if k in variables}
    logits = teacher.apply(v, jnp.asarray(images_u), mode="teacher", key_group_size=key_group_size)
    return logits, jnp.argmax(logits, -1).astype(jnp.int32)


def _first(tree: Mapping, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree[0] if isinstance(tree, (tuple, list)) else tree


def memory_of(variables: Mapping) -> dict[str, np.ndarray]:
    """{'kv_queue': (K, C, n), 'queue_ptr': (K,)} of variables (or of a bare 'memory' collection)."""
    mem = variables.get("memory", variables)
    attn = mem["allspark"]["attn"]
    return {"kv_queue": np.asarray(attn["kv_queue"]), "queue_ptr": np.asarray(attn["queue_ptr"])}


def allspark_internals(model, variables: Mapping, images_l, images_u, use_memory: bool = False, *,
                       teacher_logits=None, rng: jax.Array | None = None,
                       key_group_size: int | None = None) -> dict:
    """One training-mode forward (as the train step's student pass) with its AllSpark intermediates.

    Nothing is trained: the parameters are unchanged; the returned `memory_after` is the Semantic
    Memory the step would write (and `batch_stats_after` its BatchNorm statistics).

    Args:
      model: an `AllSparkSegmentor`.
      variables: {'params', 'batch_stats', 'memory'} (e.g. `TrainState.variables()` or
        `init_variables(...)`); the memory must have been built for crop S.
      images_l: (b, S, S, 3) labeled images (normalised).
      images_u: (b, S, S, 3) unlabeled images (the student's view; also the teacher's when
        `teacher_logits` is None).
      use_memory: the labeled-to-unlabeled attention reads the Semantic Memory (training from
        `warmup_epoch` on) instead of the unlabeled batch.
      teacher_logits: (b, S, S, K); default: `teacher_outputs(model, variables, images_u)`.
      rng: dropout / stochastic depth key (default key 0).
      key_group_size: teacher's and (without memory) student's key grouping (None = whole batch).
    Returns a dict (b = batch, C = channels of the map AllSpark transforms (MiT's stage 4, DINOv2's
    last map the DPT head reads), H = AllSpark heads, K classes, n = h * w tokens of its grid, G
    key groups, M keys per group):
      'logits'           (2b, S, S, K) student logits, labeled first.
      'teacher_logits'   (b, S, S, K); 'pseudo_labels' (b, S, S) int32 argmax.
      'channel_class'    (b, C) int32: the class each unlabeled channel is grouped under.
      'channel_class_similarity' (b, K, C) float32: the cosine similarities it is the argmax of.
      'channels_per_class' (b, K) int64: how many channels of each image went to each class.
      'attn_u'           (b, H, C, C): unlabeled channel self-attention (rows sum to 1).
      'attn_l2u'         (G, b // G, H*C, M*H*C) labeled-to-unlabeled channel cross-attention
                         (rows sum to 1). With memory: G = 1, M = K and the key axis is class-major
                         (key j = k * H*C + i: class k's memory, projected channel i). Without: M
                         images of the group, sample-major.
      'grid'             (h, w) AllSpark's token grid (n = h * w; `ModelConfig.allspark_grid`).
      'memory_before', 'memory_after'  {'kv_queue' (K, C, n), 'queue_ptr' (K,)} numpy.
      'batch_stats_after' the head's BatchNorm statistics after the forward.
    """
    images_l, images_u = jnp.asarray(images_l), jnp.asarray(images_u)
    if images_l.shape != images_u.shape:
        raise ValueError(f"labeled {images_l.shape} and unlabeled {images_u.shape} batches must have "
                         "one shape (the train step concatenates them)")
    if "memory" not in variables:
        raise ValueError("allspark_internals: these variables have no Semantic Memory; it needs "
                         "a model with AllSpark (config.method 'allspark')")
    if teacher_logits is None:
        teacher_logits, _ = teacher_outputs(model, variables, images_u, key_group_size=key_group_size)
    teacher_logits = jnp.asarray(teacher_logits)
    rng = jax.random.key(0) if rng is None else rng
    v = {k: variables[k] for k in ("params", "batch_stats", "memory")}
    x = jnp.concatenate([images_l, images_u], axis=0)
    logits, updates = model.apply(
        v, x, mode="train", teacher_logits=teacher_logits, use_memory=use_memory,
        key_group_size=key_group_size, rngs={"dropout": rng},
        mutable=["batch_stats", "memory", "intermediates"])
    inter = updates["intermediates"]
    path = ("allspark", "attn")
    channel_class = np.asarray(_first(inter, path + ("channel_class",)))
    num_classes = teacher_logits.shape[-1]
    per_class = np.stack([np.bincount(c, minlength=num_classes) for c in channel_class])
    grid = model.config.allspark_grid(images_l.shape[1:3])
    return {
        "logits": logits,
        "teacher_logits": teacher_logits,
        "pseudo_labels": jnp.argmax(teacher_logits, -1).astype(jnp.int32),
        "channel_class": channel_class,
        "channel_class_similarity": np.asarray(_first(inter, path + ("channel_class_similarity",))),
        "channels_per_class": per_class,
        "attn_u": np.asarray(_first(inter, path + ("attn_u",))),
        "attn_l2u": np.asarray(_first(inter, path + ("attn_l2u",))),
        "grid": grid,
        "memory_before": memory_of(variables),
        "memory_after": memory_of(updates),
        "batch_stats_after": updates["batch_stats"],
    }


def memory_summary(memory: Mapping) -> dict[str, np.ndarray]:
    """Per-class statistics of a Semantic Memory.

    Args:
      memory: {'kv_queue': (K, C, n), 'queue_ptr': (K,)} (`memory_of(variables)`).
    Returns:
      'row_norm' (K, C) L2 norm of every stored channel (over its n tokens);
      'class_norm' (K,) mean row norm per class;
      'class_similarity' (K, K) mean cosine similarity between the rows of two classes (the
        diagonal: within a class, self-pairs included);
      'queue_ptr' (K,) next write slot of each class's FIFO.
    """
    q = np.asarray(memory["kv_queue"], np.float64)
    norms = np.linalg.norm(q, axis=-1)
    unit = q / np.maximum(norms[..., None], 1e-12)
    mean_unit = unit.mean(axis=1)  # (K, n)
    return {"row_norm": norms.astype(np.float32), "class_norm": norms.mean(1).astype(np.float32),
            "class_similarity": (mean_unit @ mean_unit.T).astype(np.float32),
            "queue_ptr": np.asarray(memory["queue_ptr"])}


def memory_change(before: Mapping, after: Mapping) -> dict[str, np.ndarray]:
    """What a training step wrote into the Semantic Memory.

    Returns 'written' (K, C) bool slots whose contents changed; 'written_per_class' (K,) their count;
    'ptr_advance' (K,) how far each write pointer moved (mod C).
    """
    qb, qa = np.asarray(before["kv_queue"]), np.asarray(after["kv_queue"])
    written = np.any(qb != qa, axis=-1)
    c = qb.shape[1]
    adv = (np.asarray(after["queue_ptr"]) - np.asarray(before["queue_ptr"])) % c
    return {"written": written, "written_per_class": written.sum(1), "ptr_advance": adv}
