"""The training method of a run, resolved once from its config: one of the release's three trainers.

  'allspark'    train_allspark.py: self-training (a teacher's pseudo-labels on unlabeled images)
                with the AllSpark module and its Semantic Memory between encoder and head;
  'semi'        train_baseline_semi.py: the same self-training, the SegFormer head straight on the
                encoder (no AllSpark module);
  'supervised'  train_baseline_sup.py: labeled images only (no unlabeled list, teacher or
                pseudo-labels).

`Method` holds what the rest of the package asks of the method (whether the AllSpark module is on,
whether training is labeled-only, which teacher, the unlabeled student's view and CutMix), so no
module compares method names. `from_config(config)` resolves it from `config.method` and the keys
that configure self-training (`train.teacher`, `data.student_view`, `data.cutmix_prob`);
`unread_keys` names the keys a method does not read. Values and their meanings:
allspark_jax/configs/default.py.
"""
from __future__ import annotations

import dataclasses

from allspark_jax.errors import ConfigError

METHODS = ("allspark", "semi", "supervised")
TEACHERS = ("online", "ema")
STUDENT_VIEWS = ("weak", "strong")

# Keys that only some methods read. Under a method that does not read a key, the key must keep its
# configs/default.py value: a changed value would be accepted and ignored.
ALLSPARK_ONLY_KEYS = ("model.allspark_heads", "model.attn_drop", "model.proj_drop",
                      "train.warmup_epoch", "train.key_group_size")
UNLABELED_ONLY_KEYS = ("data.unlabeled_split", "data.student_view", "data.cutmix_prob",
                       "train.teacher", "train.ema_decay", "train.conf_thresh",
                       "train.loss_u_ignore_padding")
_UNREAD_BECAUSE = {
    "allspark": "only AllSpark reads it (AllSpark module, Semantic Memory, teacher keys)",
    "unlabeled": "it trains on labeled images only (no unlabeled list, teacher or pseudo-labels)",
}


@dataclasses.dataclass(frozen=True)
class Method:
    """A run's method. The self-training fields are None (CutMix 0) when `labeled_only`.

    name: 'allspark' | 'semi' | 'supervised'.
    allspark: the AllSpark module and its Semantic Memory are part of the model (and a run compiles
      one step before the memory's warm-up and one after).
    labeled_only: epochs walk the labeled list; no unlabeled images, teacher or pseudo-labels.
    teacher: 'online' (the student itself in inference mode) | 'ema' (an EMA of the student).
    student_view: the unlabeled images the student sees, 'weak' (the teacher's view) | 'strong'.
    cutmix_prob: probability of a CutMix box per unlabeled image.
    """

    name: str
    allspark: bool
    labeled_only: bool
    teacher: str | None
    student_view: str | None
    cutmix_prob: float

    @property
    def ema(self) -> bool:
        """Whether the train state carries an EMA teacher."""
        return self.teacher == "ema"

    @property
    def images_per_labeled_image(self) -> int:
        """Images a step reads per labeled image: 1 (labeled only) or 2 (+ an unlabeled one)."""
        return 1 if self.labeled_only else 2

    def unread_keys(self) -> dict[str, str]:
        """The config keys this method does not read -> why."""
        return unread_keys(self.name)


def resolve(name: str, *, teacher: str, student_view: str, cutmix_prob: float) -> Method:
    """The Method `name` with these self-training settings (ignored when it is labeled-only).

    Raises ConfigError naming config.method (or the setting) when a value is not allowed.
    """
    if name not in METHODS:
        raise ConfigError(f"config.method={name!r}: expected one of "
                          + ", ".join(repr(m) for m in METHODS))
    if name == "supervised":
        return Method(name, allspark=False, labeled_only=True, teacher=None, student_view=None,
                      cutmix_prob=0.0)
    if teacher not in TEACHERS:
        raise ConfigError(f"config.train.teacher={teacher!r}: expected one of "
                          + ", ".join(repr(t) for t in TEACHERS))
    if student_view not in STUDENT_VIEWS:
        raise ConfigError(f"config.data.student_view={student_view!r}: expected one of "
                          + ", ".join(repr(v) for v in STUDENT_VIEWS))
    return Method(name, allspark=name == "allspark", labeled_only=False, teacher=teacher,
                  student_view=student_view, cutmix_prob=float(cutmix_prob))


def from_config(config) -> Method:
    """The Method of a run's config (`method`, `train.teacher`, `data.student_view`,
    `data.cutmix_prob`)."""
    return resolve(config.method, teacher=config.train.teacher,
                   student_view=config.data.student_view, cutmix_prob=config.data.cutmix_prob)


def unread_keys(name: str) -> dict[str, str]:
    """The config keys that method `name` does not read -> why."""
    out = {}
    if name != "allspark":
        out.update(dict.fromkeys(ALLSPARK_ONLY_KEYS, _UNREAD_BECAUSE["allspark"]))
    if name == "supervised":
        out.update(dict.fromkeys(UNLABELED_ONLY_KEYS, _UNREAD_BECAUSE["unlabeled"]))
    return out
