"""The AllSpark module: channel-wise cross-attention with a class-wise Semantic Memory.

Layouts: feature maps NHWC; tokens `(B, n, C)` with n = h * w in row-major order (the order of
PyTorch's `flatten(2).transpose(1, 2)`), so every flattening below reproduces the release's.

Modes (`mode=`):
  * ``"train"``   input is ``concat(labeled, unlabeled)`` (2B images). The teacher's logits group the
    unlabeled channels by class, the Semantic Memory is written (a FIFO per class), and the labeled
    queries attend to the memory (``use_memory=True``) or to the unlabeled batch.
  * ``"teacher"`` the release's inference pass during training: every image is both labeled and
    unlabeled, and the keys mix the images of a key group (default: the whole batch).
  * ``"eval"``    each image attends only to itself: its result does not depend on the batch, as
    the release's one-image-per-call evaluation.
The memory lives in the ``"memory"`` collection (``kv_queue`` (K, C, n), ``queue_ptr`` (K,)).

Branches (`branch=`, the module's output in "eval" and "teacher" mode; the release predicts with
``"labeled"``, the others are this project's extension: `model.inference_branch` for evaluation
and predict, `train.teacher_branch` for the teacher pass):
  * ``"labeled"``   the release's inference: the labeled-to-unlabeled attention with the image's own
    channels as keys ("teacher" mode: its key group's channels).
  * ``"memory"``    the same attention with the Semantic Memory's channels as keys, as the training
    student reads it after the warm-up (the memory collection is needed, and the training crop's
    token grid; a token mask leaves the padded tokens out of the query-key sums).
  * ``"unlabeled"`` the unlabeled images' branch of the training student (channel self-attention
    with its own projections), the branch the pseudo-label loss trains.
"memory" and "unlabeled" treat each image alone: "teacher" and "eval" mode give them the same
result. The training step's teacher pass takes `teacher_branch`.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from allspark_jax.models.layers import Conv1x1
from allspark_jax.models.resize import resize_bilinear

Dtype = Any
MODES = ("train", "teacher", "eval")
BRANCHES = ("labeled", "memory", "unlabeled")


def teacher_branch(branch: str, use_memory: bool) -> str:
    """The branch that the training step's teacher pass runs for `train.teacher_branch` = `branch`.

    `branch` itself, except "memory" before the warm-up (`use_memory` False): the student's labeled
    branch then takes its keys from the batch, and the memory holds its random initialisation and
    features no step has read yet, so the teacher takes "labeled", as the student does.
    """
    if branch not in BRANCHES:
        raise ValueError(f"AllSpark branch must be one of {BRANCHES}, got {branch!r}")
    return "labeled" if branch == "memory" and not use_memory else branch

allspark_dense_init = nn.initializers.xavier_uniform()


INSTANCE_NORM_EPS = 1e-5  # nn.InstanceNorm2d's default


def instance_norm(x: jax.Array, axes=(-2, -1), eps: float = INSTANCE_NORM_EPS) -> jax.Array:
    """InstanceNorm2d without affine: normalise over `axes` with the biased variance."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axes, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axes, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def l2_normalize(x: jax.Array, axis: int, eps: float = 1e-12) -> jax.Array:
    """`F.normalize`: x / max(||x||, eps)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def channel_attention(q, k, v, keep, keep_prob: float = 1.0):
    """softmax(instance_norm(q^T k)) v over channels, the release's `CrossAttnMem` core.

    Args:
      q: (G, b, n, J) queries: J channels of n tokens, b query images per key group.
      k, v: (G, n, K) keys and values: K channels (every key image's and class's channels side by
        side) of the same n tokens.
      keep: (G, b, J, K) bool dropout mask of the attention matrix, or None (no dropout).
      keep_prob: the kept attention weights are divided by it.
    Returns:
      (G, b, n, J): out[g, b, :, j] = sum_k A[g, b, j, k] v[g, :, k], where A = dropout(softmax_k(
      instance_norm(S))) and S[g, b] = q[g, b]^T k[g] is normalised over all its (J, K) entries.

    The attention matrix (J x K per image, K = classes x J with the Semantic Memory) is the only
    large tensor of the module. Autodiff's backward of this chain transposes it twice (its matmuls
    contract it over its leading axes) and reduces it four times (the softmax's and the instance
    norm's sums). This VJP keeps it in one layout (every matmul reads it row-major; only the small
    q, k, v and output are transposed) and reads it only in matmuls and one elementwise pass: each
    of those sums is a product of (J, n) or (n, n) matrices (n tokens, n << K).
    """
    return _channel_attention_fwd(q, k, v, keep, keep_prob)[0]


def attention_probs(q, k):
    """(G, b, J, K) softmax_k(instance_norm(q^T k)): `channel_attention`'s matrix before dropout."""
    return jax.nn.softmax(instance_norm(jnp.einsum("gbnj,gnk->gbjk", q, k)), axis=-1)


def _channel_attention_fwd(q, k, v, keep, keep_prob):
    s = jnp.einsum("gbnj,gnk->gbjk", q, k)  # no 1/sqrt(d) scale in the release
    s32 = s.astype(jnp.float32)
    mu = jnp.mean(s32, (-2, -1), keepdims=True)
    r = jax.lax.rsqrt(jnp.mean(jnp.square(s32 - mu), (-2, -1), keepdims=True) + INSTANCE_NORM_EPS)
    p = jax.nn.softmax((s32 - mu) * r, axis=-1)
    d = p if keep is None else jnp.where(keep, p / keep_prob, 0.0)
    d = d.astype(v.dtype)
    out_t = jnp.einsum("gbjk,gnk->gbjn", d, v)
    # p is kept, not recomputed: the backward would redo the exponentials.
    return jnp.swapaxes(out_t, -1, -2), (q, k, v, p, d, mu, r, out_t)


def _channel_attention_bwd(keep_prob, res, g_out):
    q, k, v, p, d, mu, r, out_t = res
    n_el = p.shape[-2] * p.shape[-1]
    f32 = jnp.float32
    go = jnp.swapaxes(g_out, -1, -2)  # (G, b, J, n)
    dv = jnp.einsum("gbjn,gbjk->gnk", go, d)
    dd = jnp.einsum("gbjn,gnk->gbjk", go, v).astype(f32)  # d loss / d(dropped probs)
    # Softmax: dz = d * dd - p * c with c = sum_k d dd = sum_n go out_t (the mask and 1/keep_prob
    # are in d), a sum over the n tokens instead of the K columns.
    c = jnp.sum(go.astype(f32) * out_t.astype(f32), -1, keepdims=True)
    dz = (d.astype(f32) * dd - p * c).astype(k.dtype)
    # Instance norm: ds = r (dz - mean(dz) - z mean(dz z)) over (J, K), z = r (s - mu), s = q^T k.
    # mean(dz) is 0 (each softmax row sums to one: sum_k dz = c (1 - sum_k p)). sum dz z comes from
    # a = dz k^T, (J, n), needed for dq anyway: sum dz s = sum_nj a q. The z term of dq and dk is
    # s's factors times small (n, n) Gram matrices. No reduction reads the (J, K) matrix.
    a = jnp.einsum("gbjk,gnk->gbjn", dz, k).astype(f32)
    q32, k32 = q.astype(f32), k.astype(f32)
    dz_s = jnp.einsum("gbjn,gbnj->gb", a, q32)[..., None, None]
    w = r * r * r * dz_s / n_el  # r * mean(dz z) * r, per (g, b): (G, b, 1, 1)
    k_sum = jnp.sum(k32, -1)[:, None, None, :]  # (G, 1, 1, n)
    s_k = jnp.einsum("gbmj,gmn->gbjn", q32, jnp.einsum("gmk,gnk->gmn", k32, k32))  # s k^T
    dq = jnp.swapaxes(r * a - w * (s_k - mu * k_sum), -1, -2).astype(q.dtype)
    # dk = sum_b q ds = sum_b [r q dz - w (q q^T k - mu q 1 1^T)].
    qq = jnp.einsum("gbnj,gbmj->gnm", q32 * w, q32)
    dk = (jnp.einsum("gbnj,gbjk->gnk", (q32 * r).astype(k.dtype), dz).astype(f32)
          - jnp.einsum("gnm,gmk->gnk", qq, k32)
          + jnp.sum(jnp.sum(q32, -1, keepdims=True) * w * mu, 1))
    return dq, dk.astype(k.dtype), dv, None


channel_attention.defvjp(_channel_attention_fwd, _channel_attention_bwd)


def channel_class_similarity(teacher_logits: jax.Array, emb_u: jax.Array,
                             grid: tuple[int, int]) -> jax.Array:
    """Cosine similarity (over tokens) between each class's teacher logit map and each unlabeled
    channel's map: what `group_channels` takes the argmax of.

    Args:
      teacher_logits: (B, H, W, K) the teacher's LOGITS for the unlabeled images.
      emb_u: (B, n, C) unlabeled tokens, n = grid[0] * grid[1].
      grid: the stage-4 token grid (h, w).
    Returns:
      (B, K, C) float32.
    """
    b, _, _, k = teacher_logits.shape
    prob = resize_bilinear(teacher_logits.astype(jnp.float32), grid).reshape(b, -1, k)
    return jnp.einsum("bnk,bnc->bkc", l2_normalize(prob, 1),
                      l2_normalize(emb_u.astype(jnp.float32), 1),
                      precision=jax.lax.Precision.HIGHEST)


def group_channels(teacher_logits: jax.Array, emb_u: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """Class of each unlabeled channel (grouping by the teacher's class maps, no gradient).

    Args: as `channel_class_similarity`.
    Returns:
      (B, C) int32: argmax over classes of `channel_class_similarity` (the first on a tie).
    """
    return jnp.argmax(channel_class_similarity(teacher_logits, emb_u, grid), axis=1
                      ).astype(jnp.int32)


def update_memory(memory: jax.Array, ptr: jax.Array, cls: jax.Array, feats: jax.Array):
    """Writes each channel into its class's FIFO queue, exactly as the release's sequential loop.

    The release walks samples in batch order and, per class, writes that class's channels (in
    increasing channel index) at the class pointer, wrapping modulo C. In one vectorised pass: a
    write's slot is `(ptr[k] + rank) % C`, where `rank` counts the earlier writes to class k in
    (sample, channel) order; of several writes landing on one slot the last wins, i.e. only the
    writes with `rank >= total[k] - C` survive, so the scatter has no duplicate indices.

    Args:
      memory: (K, C, n) float; ptr: (K,) int; cls: (B, C) int class per channel;
      feats: (B, n, C) unlabeled tokens.
    Returns:
      (memory, ptr) after the update.
    """
    memory, ptr = jnp.asarray(memory), jnp.asarray(ptr)
    k_classes, c, n = memory.shape
    flat_cls = cls.reshape(-1)  # (B * C,) in (sample, channel) order
    onehot = (flat_cls[:, None] == jnp.arange(k_classes)).astype(jnp.int32)
    rank = jnp.take_along_axis(jnp.cumsum(onehot, 0) - onehot, flat_cls[:, None], 1)[:, 0]
    total = onehot.sum(0)
    slot = (ptr[flat_cls] + rank) % c
    survives = rank >= total[flat_cls] - c
    rows = jnp.swapaxes(feats, 1, 2).reshape(-1, n).astype(memory.dtype)
    memory = memory.at[jnp.where(survives, flat_cls, k_classes), slot].set(rows, mode="drop")
    return memory, ((ptr + total) % c).astype(ptr.dtype)


class CrossAttnMem(nn.Module):
    """Channel self-attention on unlabeled tokens + labeled-to-unlabeled channel cross-attention.

    `__call__(emb)`: emb (B + B_u, n, C) in "train" mode (B labeled first, then the B_u =
    teacher_logits' batch unlabeled: the release's B, or UniMatch V2's two strong views, 2B, view
    after view), (B, n, C) otherwise. Returns (B + B_u, n, C) = concat(out_l2u, out_u) in "train"
    mode, (B, n, C) = out_l2u otherwise. Before the memory is read, labeled image i's keys are the
    unlabeled images of its group of `key_group_size` (every view's).
    `token_mask` ("eval" mode only) (B, n) bool, or None: padded tokens are zeroed before the
    (bias-free) projections, so the attention's sums over tokens run over true tokens only.
    """

    dim: int
    num_heads: int
    num_classes: int
    attn_drop: float = 0.1
    proj_drop: float = 0.1
    dtype: Dtype = jnp.float32

    def _dense(self, features, name):
        return nn.Dense(features, use_bias=False, kernel_init=allspark_dense_init,
                        dtype=self.dtype, name=name)

    def _unlabeled_self_attention(self, emb_u, attn_dropout, proj_dropout):
        """(B, n, C) -> (B, n, C): channel self-attention; features split head-major into (H, C)."""
        c, heads, hc = self.dim, self.num_heads, self.dim * self.num_heads
        b, n = emb_u.shape[:2]
        q, k, v = (self._dense(hc, f"{p}_u")(emb_u).reshape(b, n, heads, c) for p in "qkv")
        a = jnp.einsum("bnhc,bnhd->bhcd", q, k)  # no 1/sqrt(d) scale in the release
        a = jax.nn.softmax(instance_norm(a), axis=-1)
        self.sow("intermediates", "attn_u", a)
        a = attn_dropout(a).astype(v.dtype)
        # (B, n, C, H) flattened channel-major: index c * H + h.
        out_u = jnp.einsum("bhcd,bnhd->bnch", a, v).reshape(b, n, c * heads)
        return proj_dropout(self._dense(c, "out_u")(out_u))

    @nn.compact
    def __call__(self, emb, *, mode: str, grid: tuple[int, int], teacher_logits=None,
                 use_memory: bool = False, key_group_size: int | None = None, token_mask=None,
                 branch: str = "labeled"):
        if mode not in MODES:
            raise ValueError(f"AllSpark mode must be one of {MODES}, got {mode!r}")
        if branch not in BRANCHES:
            raise ValueError(f"AllSpark branch must be one of {BRANCHES}, got {branch!r}")
        if branch != "labeled" and mode == "train":
            raise ValueError(f"AllSpark: branch={branch!r} is an \"eval\" / \"teacher\" mode "
                             f"choice, got mode={mode!r}")
        if token_mask is not None:
            if mode != "eval":
                raise ValueError(f"AllSpark: a token mask (true image sizes) is an \"eval\" mode "
                                 f"input, got mode={mode!r}")
            emb = jnp.where(token_mask[..., None], emb, 0)
        train = mode == "train"
        c, hc = self.dim, self.dim * self.num_heads
        attn_dropout = nn.Dropout(self.attn_drop, deterministic=not train)
        proj_dropout = nn.Dropout(self.proj_drop, deterministic=not train)
        if branch == "unlabeled":
            return self._unlabeled_self_attention(emb, attn_dropout, proj_dropout)
        if branch == "memory":
            if not self.has_variable("memory", "kv_queue"):
                raise ValueError("AllSpark: branch='memory' needs the Semantic Memory: pass the "
                                 "'memory' collection (a training state's variables)")
            train_n = self.get_variable("memory", "kv_queue").shape[-1]
            if train_n != emb.shape[1]:
                raise ValueError(f"AllSpark: branch='memory' needs the training crop's token grid: "
                                 f"the memory holds {train_n} tokens per channel, the input gives "
                                 f"{emb.shape[1]} ({grid[0]} x {grid[1]})")

        if train:
            if teacher_logits is None:
                raise ValueError("AllSpark train mode needs the teacher's logits (teacher_logits=)")
            n_u = teacher_logits.shape[0]
            n_l = emb.shape[0] - n_u
            if n_l <= 0 or n_u % n_l:
                raise ValueError(f"AllSpark train mode: {emb.shape[0]} images with {n_u} "
                                 f"unlabeled (teacher_logits); expected the unlabeled count a "
                                 f"multiple of the labeled one")
            # split, not slices: the same program as the release methods' halves had, bit for bit
            emb_l, emb_u = jnp.split(emb, [n_l], axis=0)
        else:
            emb_l = emb_u = emb

        outputs = []
        if train:
            n = emb.shape[1]
            memory = self.variable(
                "memory", "kv_queue",
                lambda: jax.random.normal(self.make_rng("params"), (self.num_classes, c, n)))
            ptr = self.variable("memory", "queue_ptr", jnp.zeros, (self.num_classes,), jnp.int32)
            if memory.value.shape[-1] != n:
                raise ValueError(
                    f"Semantic Memory holds {memory.value.shape[-1]} tokens per channel but the "
                    f"training crop gives n={n}: memory is tied to the crop size it was built for")
            sim = channel_class_similarity(jax.lax.stop_gradient(teacher_logits),
                                           jax.lax.stop_gradient(emb_u), grid)
            cls = jnp.argmax(sim, axis=1).astype(jnp.int32)  # group_channels
            self.sow("intermediates", "channel_class_similarity", sim)
            self.sow("intermediates", "channel_class", cls)
            if not self.is_initializing():
                memory.value, ptr.value = update_memory(memory.value, ptr.value, cls,
                                                        jax.lax.stop_gradient(emb_u))

            out_u = self._unlabeled_self_attention(emb_u, attn_dropout, proj_dropout)

        # Labeled-to-unlabeled cross-attention: one "head" over all H*C query channels.
        q = self._dense(hc, "q_l2u")(emb_l)  # (B, n, HC)
        k_proj, v_proj = self._dense(hc, "k_l2u"), self._dense(hc, "v_l2u")
        b = q.shape[0]
        if (train and use_memory) or branch == "memory":
            kv_queue = memory.value if train else self.get_variable("memory", "kv_queue")
            source = jnp.swapaxes(kv_queue, 1, 2)[None]  # (1, K, n, C): class-major keys
            queries = q[None]
        else:
            views = emb_u.shape[0] // b  # unlabeled images per query image (1, or 2 views)
            g = {"eval": 1}.get(mode, key_group_size or b)
            if b % g:
                raise ValueError(f"key_group_size={g} does not divide the batch of {b}")
            # (G, views * g, n, C): group j's keys are its g images of every view, view-major.
            source = emb_u.reshape(views, b // g, g, *emb_u.shape[1:]).swapaxes(0, 1)
            source = source.reshape(b // g, views * g, *emb_u.shape[1:])
            queries = q.reshape(source.shape[0], -1, *q.shape[1:])
        keys, values = k_proj(source), v_proj(source)  # (G, M, n, HC)
        g_, m = keys.shape[:2]
        # (G, n, M * HC): the key channels of every image / class side by side, sample-major.
        flat = lambda t: jnp.swapaxes(t, 1, 2).reshape(g_, t.shape[2], m * hc)  # noqa: E731
        shape = (g_, b // g_, hc, m * hc)
        if self.is_mutable_collection("intermediates"):  # inspection only: computed apart
            self.sow("intermediates", "attn_l2u", attention_probs(queries, flat(keys)))
        keep = None
        if train and self.attn_drop > 0:
            # nn.Dropout's own draw (same module, same PRNG stream) as a mask: `channel_attention`
            # applies it inside its fused softmax.
            keep = attn_dropout(jnp.ones(shape, jnp.float32)) != 0
        out = channel_attention(queries, flat(keys), flat(values), keep,
                                1.0 - self.attn_drop).reshape(b, -1, hc)
        outputs.append(proj_dropout(self._dense(c, "out_l2u")(out)))
        if train:
            outputs.append(out_u)
        return jnp.concatenate(outputs, axis=0)


class AllSpark(nn.Module):
    """map_in -> LN -> CrossAttnMem -> residual -> LN -> map_out. (B, h, w, C) -> (B, h, w, C).

    `valid` ("eval" mode only) (B, h, w) bool, or None: the true tokens of each image of a padded
    batch. Every other step is per token, so only the attention's token sums need the mask.
    """

    num_heads: int
    num_classes: int
    attn_drop: float = 0.1
    proj_drop: float = 0.1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, e4, *, mode: str, teacher_logits=None, use_memory: bool = False,
                 key_group_size: int | None = None, valid=None, branch: str = "labeled"):
        b, h, w, c = e4.shape
        conv = lambda name: Conv1x1(c, dtype=self.dtype, name=name)  # noqa: E731
        en = nn.gelu(conv("map_in")(e4), approximate=False).reshape(b, h * w, c)
        emb = nn.LayerNorm(1e-6, name="attn_norm")(en)
        emb = CrossAttnMem(c, self.num_heads, self.num_classes, self.attn_drop, self.proj_drop,
                           self.dtype, name="attn")(
            emb, mode=mode, grid=(h, w), teacher_logits=teacher_logits, use_memory=use_memory,
            key_group_size=key_group_size,
            token_mask=None if valid is None else valid.reshape(b, h * w), branch=branch)
        emb = nn.LayerNorm(1e-6, name="encoder_norm")(emb + en)
        return nn.gelu(conv("map_out")(emb.reshape(b, h, w, c)), approximate=False)
