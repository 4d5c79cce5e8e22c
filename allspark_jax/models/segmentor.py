"""The AllSpark segmentor: MiT encoder -> AllSpark on the stage-4 map -> SegFormer head.

Variables: ``params``; ``batch_stats`` (the head's BatchNorm); ``memory`` (the Semantic Memory and
its write pointers). All three are produced by `init_variables` and consumed by `apply`.
With ``ModelConfig.allspark=False`` the network is plain SegFormer (MiT encoder -> SegFormer head):
no ``allspark`` params and no ``memory`` collection.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from allspark_jax import method as method_lib
from allspark_jax.models.allspark import AllSpark
from allspark_jax.models.head import SegFormerHead
from allspark_jax.models.mit import MiTConfig, MixVisionTransformer, grid_mask, token_grid_sizes
from allspark_jax.models.resize import resize_bilinear, resize_bilinear_valid

Dtype = Any


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes the network's architecture; `model_config_from` builds it from a run's
    config (values and meanings: allspark_jax/configs/default.py, `model.*`).

    `allspark` (the method's `Method.allspark`): False is plain SegFormer, the stage-4 map goes to
    the head unchanged (no allspark params, no memory; `mode` then only switches dropout and
    BatchNorm statistics, and `allspark_heads`, `attn_drop`, `proj_drop` are not read).
    """

    backbone: MiTConfig
    num_classes: int
    allspark_heads: int
    decoder_dim: int
    head_dropout: float
    attn_drop: float
    proj_drop: float
    allspark: bool


class AllSparkSegmentor(nn.Module):
    """(B, H, W, 3) normalised images -> (B, H, W, K) float32 logits.

    `mode` is one of "train", "teacher", "eval" (see `allspark_jax.models.allspark`). In "train"
    mode `x` is ``concat(labeled, unlabeled)`` and `teacher_logits` (B_u, H, W, K) are required;
    dropout and stochastic depth need a ``"dropout"`` PRNG stream, and ``batch_stats`` and
    ``memory`` must be mutable.

    `branch` (`allspark_jax.models.allspark.BRANCHES`): which AllSpark branch produces the stage-4
    map in "eval" mode. The release's inference is "labeled"; the others are for inspection
    ("memory" needs the ``memory`` collection: `inference_collections`).

    `valid_size` ("eval" mode only) (B, 2) int, or None: x is a padded batch and image b is
    x[b, :valid_size[b, 0], :valid_size[b, 1]] (top-left). Its logits, the same region of the
    output, then equal those of the image alone at its own size, as the release evaluates; the
    rest of the output is 0. The sizes are traced: one program serves every size up to (H, W)
    (see `allspark_jax.bucketing`). Each layer's rule is documented where it is applied: the
    encoder's masks (`MixVisionTransformer`), AllSpark's token sums (`CrossAttnMem`), the true-size
    upsampling (`LinearFuse`, `resize_bilinear_valid`).
    """

    config: ModelConfig
    dtype: Dtype = jnp.float32
    remat: bool = False
    branch: str = "labeled"

    @nn.compact
    def __call__(self, x, *, mode: str = "eval", teacher_logits=None, use_memory: bool = False,
                 key_group_size: int | None = None, valid_size=None):
        cfg = self.config
        train = mode == "train"
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
        if cfg.allspark:
            c4 = AllSpark(cfg.allspark_heads, cfg.num_classes, cfg.attn_drop, cfg.proj_drop,
                          self.dtype, name="allspark")(
                c4, mode=mode, teacher_logits=teacher_logits, use_memory=use_memory,
                key_group_size=key_group_size,
                valid=None if grids is None else grid_mask(grids[3], c4.shape[1:3]),
                branch=self.branch if mode == "eval" else "labeled")
        elif self.branch != "labeled":
            raise ValueError(f"branch={self.branch!r}: this model has no AllSpark module (method "
                             f"'semi' / 'supervised')")
        logits = SegFormerHead(cfg.num_classes, cfg.decoder_dim, cfg.head_dropout, self.dtype,
                               name="head")([c1, c2, c3, c4], train, grids)
        if grids is None:
            return resize_bilinear(logits.astype(jnp.float32), x.shape[1:3])
        return resize_bilinear_valid(logits.astype(jnp.float32), x.shape[1:3], grids[0],
                                     valid_size)


def init_variables(model: AllSparkSegmentor, rng: jax.Array, crop_size: int | tuple[int, int],
                   batch_size: int = 1) -> dict:
    """Initialises params, batch_stats and memory for training crops of `crop_size`.

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
    return variables


def model_config_from(config) -> ModelConfig:
    """A run's config (`model.*` and the method) -> ModelConfig.

    `config.model.backbone` is a preset name ("b0" ... "b5") or a dict of `MiTConfig` fields;
    `drop_path_rate` overrides the backbone's stochastic depth; a method without AllSpark (the
    release's baselines) gives the model without the AllSpark module.
    """
    method = method_lib.from_config(config)
    config = config.model
    backbone = config.backbone
    extra = {} if config.get("drop_path_rate") is None else {"drop_path_rate": config.drop_path_rate}
    if isinstance(backbone, str):
        mit = MiTConfig.preset(backbone, **extra)
    else:
        fields = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in dict(backbone).items()}
        unknown = set(fields) - {f.name for f in dataclasses.fields(MiTConfig)}
        if unknown:
            raise ValueError(f"config.model.backbone: unknown MiT fields {sorted(unknown)}")
        mit = MiTConfig(**{**fields, **extra})
    return ModelConfig(backbone=mit, num_classes=config.num_classes,
                       allspark_heads=config.allspark_heads, decoder_dim=config.decoder_dim,
                       head_dropout=config.head_dropout, attn_drop=config.attn_drop,
                       proj_drop=config.proj_drop, allspark=method.allspark)


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# JAX's matmul / convolution precisions for float32 models (`model.precision`).
PRECISIONS = ("default", "high", "highest")


def build_model(config) -> AllSparkSegmentor:
    """A run's config -> the Flax module (architecture, compute dtype, rematerialisation)."""
    dtype = config.model.dtype
    if dtype not in DTYPES:
        raise ValueError(f"config.model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return AllSparkSegmentor(model_config_from(config), DTYPES[dtype], bool(config.model.remat))
