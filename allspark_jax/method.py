"""The training method of a run, resolved once from its config: one of the release's three
trainers, or UniMatch V2's recipe with or without the AllSpark module.

  'allspark'    train_allspark.py: self-training (a teacher's pseudo-labels on unlabeled images)
                with the AllSpark module and its Semantic Memory between encoder and head;
  'semi'        train_baseline_semi.py: the same self-training, the head straight on the
                encoder (no AllSpark module);
  'supervised'  train_baseline_sup.py: labeled images only (no unlabeled list, teacher or
                pseudo-labels).
  'unimatch_v2' UniMatch V2's unimatch_v2.py: an EMA teacher (decay min(1 - 1/(t + 1),
                train.ema_decay)) labels the weak view; the student learns them on two strong
                views, each with its own CutMix box, with complementary channel dropout between
                the two; loss (loss_x + (loss_s1 + loss_s2) / 2) / 2 (`allspark_jax.train_step`).
  'unimatch_v2_allspark'
                the same recipe with the AllSpark module in student and teacher (this project's
                combination: the release never trained it): the Semantic Memory is filled from
                both strong views, and the labeled features are reborn from them.

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

METHODS = ("allspark", "semi", "supervised", "unimatch_v2", "unimatch_v2_allspark")
# Training recipes: the release's iteration ('allspark', 'semi', 'supervised') or UniMatch V2's.
RECIPES = ("release", "unimatch_v2")
TEACHERS = ("online", "ema")
STUDENT_VIEWS = ("weak", "strong")

# Keys that only some methods read. Under a method that does not read a key, the key must keep its
# configs/default.py value: a changed value would be accepted and ignored.
ALLSPARK_ONLY_KEYS = ("model.allspark_heads", "model.attn_drop", "model.proj_drop",
                      "model.inference_branch", "train.teacher_branch", "train.warmup_epoch",
                      "train.key_group_size")
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

    name: one of METHODS.
    recipe: 'release' (the release's trainers) | 'unimatch_v2' (two strong views, each with its
      own CutMix box, complementary dropout, the EMA teacher on its schedule, its loss).
    allspark: the AllSpark module and its Semantic Memory are part of the model (and a run compiles
      one step before the memory's warm-up and one after).
    labeled_only: epochs walk the labeled list; no unlabeled images, teacher or pseudo-labels.
    teacher: 'online' (the student itself in inference mode) | 'ema' (an EMA of the student).
    student_view: the unlabeled images the student sees, 'weak' (the teacher's view) | 'strong'.
    cutmix_prob: probability of a CutMix box per unlabeled image.
    """

    name: str
    recipe: str
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
    def strong_views(self) -> int:
        """Strong views (each with its CutMix box) of every unlabeled image: 2 under UniMatch V2's
        recipe, else 1 (the student view)."""
        return 2 if self.recipe == "unimatch_v2" else 1

    @property
    def images_per_labeled_image(self) -> int:
        """Training images a step reads per labeled image: 1 (labeled only) or 2 (+ an unlabeled
        one, whatever number of views of it the teacher and student see)."""
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
        return Method(name, "release", allspark=False, labeled_only=True, teacher=None,
                      student_view=None, cutmix_prob=0.0)
    if teacher not in TEACHERS:
        raise ConfigError(f"config.train.teacher={teacher!r}: expected one of "
                          + ", ".join(repr(t) for t in TEACHERS))
    if student_view not in STUDENT_VIEWS:
        raise ConfigError(f"config.data.student_view={student_view!r}: expected one of "
                          + ", ".join(repr(v) for v in STUDENT_VIEWS))
    recipe = "unimatch_v2" if name.startswith("unimatch_v2") else "release"
    if recipe == "unimatch_v2" and (teacher, student_view) != ("ema", "strong"):
        key, value, want = (("train.teacher", teacher, "ema") if teacher != "ema"
                            else ("data.student_view", student_view, "strong"))
        raise ConfigError(f"config.{key}={value!r}: method {name!r} (UniMatch V2's recipe) trains "
                          f"with {'its EMA teacher' if key == 'train.teacher' else 'strong views'};"
                          f" expected {want!r} (the dataset configs' {name!r} argument sets the "
                          "recipe, e.g. configs/pascal.py:1_16," + name + ")")
    return Method(name, recipe, allspark=name in ("allspark", "unimatch_v2_allspark"),
                  labeled_only=False, teacher=teacher, student_view=student_view,
                  cutmix_prob=float(cutmix_prob))


def from_config(config) -> Method:
    """The Method of a run's config (`method`, `train.teacher`, `data.student_view`,
    `data.cutmix_prob`)."""
    return resolve(config.method, teacher=config.train.teacher,
                   student_view=config.data.student_view, cutmix_prob=config.data.cutmix_prob)


def unread_keys(name: str) -> dict[str, str]:
    """The config keys that method `name` does not read -> why."""
    out = {}
    if name not in ("allspark", "unimatch_v2_allspark"):
        out.update(dict.fromkeys(ALLSPARK_ONLY_KEYS, _UNREAD_BECAUSE["allspark"]))
    if name == "supervised":
        out.update(dict.fromkeys(UNLABELED_ONLY_KEYS, _UNREAD_BECAUSE["unlabeled"]))
    return out
