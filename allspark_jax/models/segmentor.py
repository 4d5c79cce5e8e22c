"""The AllSpark segmentor on either encoder family (`ModelConfig.encoder`):

  * ``"mit"``    (the release's): MiT encoder -> AllSpark on the stage-4 map -> SegFormer head.
  * ``"dinov2"`` (UniMatch V2's model with AllSpark inside): DINOv2 encoder -> its four
    intermediate layers (`DPTConfig.layers`, final-normed, class token dropped, (B, h, w, D) on the
    14-px token grid) -> AllSpark on the last of them -> UniMatch V2's DPT head -> logits resized
    (bilinear, align_corners=True) to (14 h, 14 w). The release puts AllSpark between the encoder
    and the head, on the deepest map the head reads (MiT's stage 4, the coarsest and most semantic);
    DINOv2's maps all share one grid, and the deepest read block is the most semantic, so AllSpark
    takes that one and the Semantic Memory holds h * w tokens per channel of the training crop's
    14-px grid (37 x 37 = 1369 at 518 px).

Variables: ``params``; ``batch_stats`` (the SegFormer head's BatchNorm; an empty collection for
DINOv2, whose DPT head has none); ``memory`` (the Semantic Memory and its write pointers). All
three are produced by `init_variables` and consumed by `apply`. With ``ModelConfig.allspark=False``
the network is the plain baseline (SegFormer, or UniMatch V2's DPT model): no ``allspark`` params
and no ``memory`` collection.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from allspark_jax import method as method_lib
from allspark_jax.models.allspark import AllSpark, teacher_branch
from allspark_jax.models.dinov2 import DINOv2, DINOv2Config, patch_map, token_grid
from allspark_jax.models.dpt import (DPTConfig, DPTHead, eval_input_size, resize_eval_input,
                                     resize_eval_output, resize_to_patch_grid)
from allspark_jax.models.head import SegFormerHead
from allspark_jax.models.layers import complementary_dropout_scale
from allspark_jax.models.mit import MiTConfig, MixVisionTransformer, grid_mask, token_grid_sizes
from allspark_jax.models.mit import token_grid as mit_token_grid
from allspark_jax.models.resize import (checked_sizes, resize_bilinear,
                                        resize_bilinear_align_corners, resize_bilinear_valid)

Dtype = Any
ENCODERS = ("mit", "dinov2")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes the network's architecture; `model_config_from` builds it from a run's
    config (values and meanings: allspark_jax/configs/default.py, `model.*`).

    The encoder family (`encoder`) follows the backbone's type: a MiTConfig is "mit" (the SegFormer
    head: `decoder_dim`, `head_dropout`; `dpt` None), a DINOv2Config "dinov2" (`dpt` the DPT head;
    `decoder_dim` and `head_dropout` are not read).
    `allspark` (the method's `Method.allspark`): False is the plain baseline, the map goes to the
    head unchanged (no allspark params, no memory; `mode` then only switches dropout and
    BatchNorm statistics, and `allspark_heads`, `attn_drop`, `proj_drop` are not read).
    """

    backbone: MiTConfig | DINOv2Config
    num_classes: int
    allspark_heads: int
    decoder_dim: int
    head_dropout: float
    attn_drop: float
    proj_drop: float
    allspark: bool
    dpt: DPTConfig | None = None  # the DPT head of a DINOv2 backbone; None for MiT

    def __post_init__(self):
        if not isinstance(self.backbone, (MiTConfig, DINOv2Config)):
            raise TypeError(f"backbone must be a MiTConfig or a DINOv2Config, got "
                            f"{type(self.backbone).__name__}")
        if (self.dpt is None) != (self.encoder == "mit"):
            raise ValueError(f"a {type(self.backbone).__name__} backbone needs dpt="
                             f"{'None' if self.encoder == 'mit' else 'a DPTConfig'}")
        if self.dpt is not None:
            if self.dpt.num_classes != self.num_classes:
                raise ValueError(f"dpt.num_classes {self.dpt.num_classes} != num_classes "
                                 f"{self.num_classes}")
            if self.dpt.layers[-1] >= self.backbone.depth:
                raise ValueError(f"DPT layers {self.dpt.layers} read blocks beyond the encoder's "
                                 f"depth {self.backbone.depth}")

    @property
    def encoder(self) -> str:
        """"mit" or "dinov2" (`ENCODERS`)."""
        return "dinov2" if isinstance(self.backbone, DINOv2Config) else "mit"

    def allspark_grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """The token grid (h, w) of the map AllSpark transforms for an (H, W) input: MiT's stage-4
        grid, or DINOv2's floor((H, W) / patch). The Semantic Memory of a crop holds h * w tokens
        per channel."""
        if self.encoder == "dinov2":
            return token_grid(tuple(size), self.backbone.patch_size)
        return tuple(mit_token_grid(d, self.backbone)[-1] for d in size[:2])

    def eval_allspark_grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """The token grid (h, w) of the map AllSpark transforms for an (H, W) image in "eval"
        mode: DINOv2's of the image as resized for evaluation (`models.dpt.eval_input_size`), MiT's
        `allspark_grid`."""
        if self.encoder == "dinov2":
            return self.allspark_grid(eval_input_size(tuple(size), self.backbone.patch_size))
        return self.allspark_grid(size)

    @property
    def patch_multiple(self) -> int:
        """Training crops must be multiples of this (1: any size)."""
        return self.backbone.patch_size if self.encoder == "dinov2" else 1


class AllSparkSegmentor(nn.Module):
    """(B, H, W, 3) normalised images -> (B, H, W, K) float32 logits.

    With ``ModelConfig.allspark=False`` and a DINOv2 backbone this is UniMatch V2's DPT model: its
    parameter tree (`backbone`, `head`) and its forward (`DPT.forward`) in "train" / "teacher"
    mode; `dpt_model` builds it from the two configs.

    `mode` is one of "train", "teacher", "eval" (see `allspark_jax.models.allspark`). In "train"
    mode `x` is ``concat(labeled, unlabeled)`` and `teacher_logits` (B_u, H, W, K) are required;
    dropout and stochastic depth need a ``"dropout"`` PRNG stream, and ``batch_stats`` and
    ``memory`` must be mutable.

    `branch` (`allspark_jax.models.allspark.BRANCHES`): which AllSpark branch produces the map it
    transforms in "eval" and "teacher" mode ("train" mode runs the student's branches). The
    release's is "labeled"; `build_model` takes `model.inference_branch` (evaluation, predict), the
    training step's teacher pass `train.teacher_branch` (`teacher_model`). "memory" needs the
    ``memory`` collection (`evaluation.bucketing.inference_collections`) and the training crop's
    token grid.

    `valid_size` ("eval" mode only) (B, 2) int, or None: x is a padded batch and image b is
    x[b, :valid_size[b, 0], :valid_size[b, 1]] (top-left). Its logits, the same region of the
    output, then equal those of the image alone at its own size, as the release evaluates; the
    rest of the output is 0. The sizes are traced: one program serves every size up to (H, W)
    (see `allspark_jax.bucketing`). Each layer's rule is documented where it is applied: the
    encoder's masks (`MixVisionTransformer`; DINOv2's in `models.dinov2`), AllSpark's token sums
    (`CrossAttnMem`), the true-size upsampling (`LinearFuse`, `resize_bilinear_valid`; the DPT
    head's in `models.dpt`). For DINOv2 "eval" mode is UniMatch V2's evaluation (`_dinov2`).
    `feature_scale` ("train" / "teacher" mode) or None: UniMatch V2's complementary channel
    dropout (`draw_feature_scale`) of the maps the head reads, after AllSpark: for DINOv2 one
    (B, D) scale of all four maps (its `comp_drop=True` forward), for MiT one (B, C_i) scale per
    stage map (UniMatch V2's dropout applied to each of MiT's four maps, which differ in width).
    In "train" mode with AllSpark the batch is ``concat(labeled, unlabeled)`` with B_u =
    teacher_logits' batch unlabeled images, B_u a multiple of the labeled count (UniMatch V2's
    recipe: both strong views, `allspark_jax.models.allspark.CrossAttnMem`).
    """

    config: ModelConfig
    dtype: Dtype = jnp.float32
    remat: bool = False
    branch: str = "labeled"

    @nn.compact
    def __call__(self, x, *, mode: str = "eval", teacher_logits=None, use_memory: bool = False,
                 key_group_size: int | None = None, valid_size=None, feature_scale=None):
        cfg = self.config
        if cfg.encoder == "dinov2":
            return self._dinov2(x, mode, teacher_logits, use_memory, key_group_size, valid_size,
                                feature_scale)
        train = mode == "train"
        if feature_scale is not None:
            widths = tuple(cfg.backbone.embed_dims)
            if mode == "eval":
                raise ValueError("feature_scale (complementary channel dropout) is a training "
                                 "input, got mode='eval'")
            shapes = tuple(getattr(f, "shape", None) for f in feature_scale)
            if shapes != tuple((x.shape[0], w) for w in widths):
                raise ValueError(f"feature_scale of a MiT encoder: one (B, C) scale per stage map, "
                                 f"{tuple((x.shape[0], w) for w in widths)}, got {shapes}")
        if valid_size is None:
            grids = None
        else:
            if mode != "eval":
                raise ValueError(f"valid_size (true image sizes of a padded batch) is an \"eval\" "
                                 f"mode input, got mode={mode!r}")
            valid_size = jnp.asarray(valid_size)
            if valid_size.shape != (x.shape[0], 2) or not jnp.issubdtype(valid_size.dtype,
                                                                          jnp.integer):
                raise ValueError(f"valid_size must be ({x.shape[0]}, 2) int (height, width) for a "
                                 f"batch of {x.shape[0]}, got {valid_size.shape} "
                                 f"{valid_size.dtype}")
            grids = token_grid_sizes(valid_size, cfg.backbone)
        c1, c2, c3, c4 = MixVisionTransformer(cfg.backbone, self.dtype, self.remat,
                                              name="backbone")(x.astype(self.dtype), train,
                                                               valid_size)
        c4 = self._allspark(c4, mode, teacher_logits, use_memory, key_group_size,
                            None if grids is None else grid_mask(grids[3], c4.shape[1:3]))
        maps = [c1, c2, c3, c4]
        if feature_scale is not None:
            maps = [m * f[:, None, None, :].astype(m.dtype) for m, f in zip(maps, feature_scale)]
        logits = SegFormerHead(cfg.num_classes, cfg.decoder_dim, cfg.head_dropout, self.dtype,
                               name="head")(maps, train, grids)
        if grids is None:
            return resize_bilinear(logits.astype(jnp.float32), x.shape[1:3])
        return resize_bilinear_valid(logits.astype(jnp.float32), x.shape[1:3], grids[0],
                                     valid_size)

    def _allspark(self, x, mode, teacher_logits, use_memory, key_group_size, valid):
        """The AllSpark module on the (B, h, w, C) map `x` (or `x` itself without AllSpark)."""
        cfg = self.config
        if not cfg.allspark:
            if self.branch != "labeled":
                raise ValueError(f"branch={self.branch!r}: this model has no AllSpark module "
                                 f"(method 'semi' / 'supervised')")
            return x
        return AllSpark(cfg.allspark_heads, cfg.num_classes, cfg.attn_drop, cfg.proj_drop,
                        self.dtype, name="allspark")(
            x, mode=mode, teacher_logits=teacher_logits, use_memory=use_memory,
            key_group_size=key_group_size, valid=valid,
            branch="labeled" if mode == "train" else self.branch)

    def _dinov2(self, x, mode, teacher_logits, use_memory, key_group_size, valid_size,
                feature_scale):
        """The DINOv2 family's forward (module docstring).

        "train" / "teacher" mode: (H, W) must be multiples of the patch (the training crop); the
        logits are UniMatch V2's `DPT.forward`'s. "eval" mode is UniMatch V2's `evaluate`
        ('original' mode, multiplier 14) of each image: resized (bilinear, align_corners=True) to
        `models.dpt.eval_input_size`, the forward, the logits resized back to (H, W) the same way; with
        `valid_size`, per image of a padded batch (`models.dpt`: the true token grids through
        encoder, AllSpark and head), 0 outside each image. An image side below half a patch
        rounds to 0 patches: an error alone, zero logits in a padded batch.
        `feature_scale` (B, D) or None ("train" / "teacher" mode): UniMatch V2's complementary
        channel dropout (`models.dpt.complementary_dropout_scale`) of the four maps the head reads
        (after AllSpark), its `comp_drop=True` forward."""
        cfg = self.config
        p = cfg.backbone.patch_size
        size = tuple(x.shape[1:3])
        valid_grid = model_sizes = None
        if mode == "eval":
            if feature_scale is not None:
                raise ValueError("feature_scale (complementary channel dropout) is a training "
                                 "input, got mode='eval'")
            if valid_size is not None:
                valid_size = checked_sizes(valid_size, x.shape[0], "valid_size")
                x, model_sizes = resize_eval_input(x.astype(jnp.float32), valid_size, p)
                valid_grid = model_sizes // p
            else:
                run = eval_input_size(size, p)
                if min(run) < p:
                    raise ValueError(f"an image of {size[0]}x{size[1]} rounds to no {p}-px patch "
                                     f"on a side (UniMatch V2's evaluation size {run})")
                if run != size:
                    x = resize_bilinear_align_corners(x.astype(jnp.float32), run)
        elif valid_size is not None:
            raise ValueError(f"valid_size (true image sizes of a padded batch) is an \"eval\" "
                             f"mode input, got mode={mode!r}")
        elif size[0] % p or size[1] % p:
            raise ValueError(f"DINOv2 {mode!r} mode needs an input whose sides are multiples of "
                             f"the {p}-px patch (the training crop), got {size[0]}x{size[1]}")
        grid = token_grid(x.shape[1:3], p)
        tokens = DINOv2(cfg.backbone, self.dtype, name="backbone")(
            x.astype(self.dtype), cfg.dpt.layers, valid_grid=valid_grid)
        maps = [patch_map(t, grid) for t in tokens]
        maps[-1] = self._allspark(maps[-1], mode, teacher_logits, use_memory, key_group_size,
                                  None if valid_grid is None else grid_mask(valid_grid, grid))
        logits = DPTHead(cfg.dpt, self.dtype, name="head")(maps, feature_scale,
                                                           valid_grid=valid_grid)
        logits = resize_to_patch_grid(logits.astype(jnp.float32), grid, p, valid_grid)
        if valid_grid is not None:
            return resize_eval_output(logits, size, model_sizes, valid_size)
        if logits.shape[1:3] != size:
            logits = resize_bilinear_align_corners(logits, size)
        return logits


def teacher_model(model: AllSparkSegmentor, branch: str, use_memory: bool) -> AllSparkSegmentor:
    """The model of a training step's teacher pass through the AllSpark branch `branch`
    (`train.teacher_branch`; `allspark_jax.models.allspark.teacher_branch`: "memory" is "labeled"
    before the warm-up, `use_memory` False)."""
    branch = teacher_branch(branch, use_memory)
    return model if branch == model.branch else model.clone(branch=branch)


def draw_feature_scale(config: ModelConfig, key: jax.Array, batch: int):
    """UniMatch V2's complementary channel dropout for a strong batch of `batch` images (its two
    views concatenated), as `AllSparkSegmentor`'s `feature_scale`: DINOv2 one (batch, D) scale
    (`complementary_dropout_scale`), MiT a tuple of one per stage map (independent keys)."""
    if config.encoder == "dinov2":
        return complementary_dropout_scale(key, batch, config.backbone.embed_dim)
    widths = config.backbone.embed_dims
    return tuple(complementary_dropout_scale(k, batch, w)
                 for k, w in zip(jax.random.split(key, len(widths)), widths))


def init_variables(model: AllSparkSegmentor, rng: jax.Array, crop_size: int | tuple[int, int],
                   batch_size: int = 1) -> dict:
    """Initialises params, batch_stats and memory for training crops of `crop_size` (for the
    DINOv2 encoder a multiple of its patch).

    The memory's token count n depends on the crop, so initialisation runs the training path.
    Without AllSpark (`ModelConfig.allspark=False`) there is no memory and the result has no
    ``memory`` entry.
    """
    h, w = (crop_size, crop_size) if isinstance(crop_size, int) else crop_size
    x = jnp.zeros((2 * batch_size, h, w, 3), jnp.float32)
    t = jnp.zeros((batch_size, h, w, model.config.num_classes), jnp.float32)
    params_rng, dropout_rng = jax.random.split(rng)
    variables = model.init({"params": params_rng, "dropout": dropout_rng}, x, mode="train",
                           teacher_logits=t)
    variables = dict(variables)
    variables.pop("intermediates", None)
    # Every model has the collection (the DPT head has no BatchNorm): one state layout for all.
    variables.setdefault("batch_stats", {})
    return variables


def _fields(value, cls, key: str) -> dict:
    """A config dict of `cls`'s dataclass fields (lists as tuples); unknown names are an error."""
    fields = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in dict(value).items()}
    unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"config.{key}: unknown {cls.__name__} fields {sorted(unknown)}")
    return fields


def _mit(backbone, extra: dict) -> MiTConfig:
    if isinstance(backbone, str):
        return MiTConfig.preset(backbone, **extra)
    return MiTConfig(**{**_fields(backbone, MiTConfig, "model.backbone"), **extra})


def _dinov2(backbone, dpt, num_classes: int) -> tuple[DINOv2Config, DPTConfig]:
    """`model.backbone` (a DINOv2 size or DINOv2Config fields) and `model.dpt` (DPTConfig fields,
    None = the size's head) -> (encoder, head)."""
    head = {k: v for k, v in _fields(dpt, DPTConfig, "model.dpt").items() if v is not None}
    if isinstance(backbone, str):
        return (DINOv2Config.preset(backbone),
                DPTConfig.preset(backbone, **{**head, "num_classes": num_classes}))
    missing = sorted({"features", "out_channels", "layers"} - set(head))
    if missing:
        raise ValueError(f"config.model.dpt.{missing[0]}: a DINOv2 backbone given by its fields "
                         f"has no preset head; set model.dpt.features, out_channels and layers")
    return (DINOv2Config(**_fields(backbone, DINOv2Config, "model.backbone")),
            DPTConfig(**{**head, "num_classes": num_classes}))


def small_crop(model: ModelConfig, side: int = 64) -> int:
    """The largest training crop <= `side` for `model` (a multiple of its patch, at least one):
    to build variables cheaply where the Semantic Memory's length is not needed."""
    m = model.patch_multiple
    return max(m, side // m * m)


def model_config_from(config) -> ModelConfig:
    """A run's config (`model.*` and the method) -> ModelConfig.

    `config.model.encoder` picks the family. 'mit': `config.model.backbone` is a preset name
    ("b0" ... "b5") or a dict of `MiTConfig` fields; `drop_path_rate` overrides the backbone's
    stochastic depth. 'dinov2': `config.model.backbone` is a DINOv2 size ("small" ... "giant") or
    a dict of `DINOv2Config` fields, `config.model.dpt` the head's fields (those None: the size's
    UniMatch V2 head). A method without AllSpark (the release's baselines) gives the model without
    the AllSpark module.
    """
    method = method_lib.from_config(config)
    config = config.model
    encoder = config.encoder
    if encoder not in ENCODERS:
        raise ValueError(f"config.model.encoder must be one of {ENCODERS}, got {encoder!r}")
    if encoder == "mit":
        extra = ({} if config.get("drop_path_rate") is None
                 else {"drop_path_rate": config.drop_path_rate})
        backbone, dpt = _mit(config.backbone, extra), None
    else:
        backbone, dpt = _dinov2(config.backbone, config.get("dpt") or {}, config.num_classes)
    return ModelConfig(backbone=backbone, num_classes=config.num_classes,
                       allspark_heads=config.allspark_heads, decoder_dim=config.decoder_dim,
                       head_dropout=config.head_dropout, attn_drop=config.attn_drop,
                       proj_drop=config.proj_drop, allspark=method.allspark, dpt=dpt)


def dpt_model(encoder: DINOv2Config, head: DPTConfig, dtype: Dtype = jnp.float32
              ) -> AllSparkSegmentor:
    """UniMatch V2's DPT model (DINOv2 encoder + DPT head, no AllSpark) from its two configs."""
    # The AllSpark and SegFormer fields are not read without AllSpark and with a DPT head.
    return AllSparkSegmentor(ModelConfig(backbone=encoder, num_classes=head.num_classes,
                                         allspark_heads=0, decoder_dim=0, head_dropout=0.0,
                                         attn_drop=0.0, proj_drop=0.0, allspark=False, dpt=head),
                             dtype)


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# JAX's matmul / convolution precisions for float32 models (`model.precision`).
PRECISIONS = ("default", "high", "highest")


def build_model(config) -> AllSparkSegmentor:
    """A run's config -> the Flax module (architecture, compute dtype, rematerialisation, and the
    AllSpark branch it predicts with outside training, `model.inference_branch`)."""
    dtype = config.model.dtype
    if dtype not in DTYPES:
        raise ValueError(f"config.model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return AllSparkSegmentor(model_config_from(config), DTYPES[dtype], bool(config.model.remat),
                             branch=config.model.inference_branch)
