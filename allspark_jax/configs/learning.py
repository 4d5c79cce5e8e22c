"""The learning benchmark's task: does training with unlabeled images beat training without them?

    python -m allspark_jax.experiments.learning --config configs/learning.py --seeds 0,1,2 \
        --methods supervised,semi,allspark --json out.json

The synthetic dataset (allspark_jax.data.synthetic: 5 classes, a textured background and four
shapes with per-class colour and stripes, images of 60-80 px) with 320 training images of which 40
(1/8) are labeled, and 64 validation images that no method trains on. The demo's small MiT (embed
dims 16/32/64/96, one block per stage, 64-dim decoder), 64 px crops, 8 labeled (+ 8
unlabeled) images a step. An epoch walks the 280 unlabeled images (35 steps); 8 epochs = 280 steps,
the Semantic Memory read from epoch 2. The benchmark gives every method the same number of steps
(the supervised runs, whose epochs walk the labeled list, get as many epochs as that takes).

Every run's encoder starts from a pretrained one, as the paper's start from ImageNet weights: a
supervised model trained first for 640 steps (8 epochs) on a source task of 640 labeled synthetic
images of 9 classes (other shape / colour / stripe pairings; rendering seed 1000, so no image of
the comparison), shared by every row and seed. `--config.learning.pretrain_steps=0` trains every
run from scratch instead.
`--config.KEY=VALUE` overrides any key, as in main.py.

The argument `dinov2` (`--config configs/learning.py:dinov2`) runs the same comparison on the
demo's tiny DINOv2 with its DPT head (`configs/demo.py:dinov2`: 56 px crops, 4 x 4 tokens) at lr
0.05 for every row and the source task, every run's encoder started from the same kind of
source-task model (a DINOv2 of that size, written as a `dinov2_vit*14_pretrain.pth`-style state
dict).

The argument `regime` (`--config configs/learning.py:regime`, with a method or encoder
`...:supervised,regime`) swaps the task for one in the paper's regime, where the labels, not the
task, limit the supervised baseline (as on Pascal with 1/16 of the labels: about 20 points below
full labels): REGIME_TASK.
- 7 classes: the background and six objects, each its own shape / stripes / hue pairing
  (`synthetic.class_style` for 7 classes; two pairs share a shape and differ by hue and stripes).
- Up to 4 objects per image (`data.synthetic.max_objects`), so objects occlude one another more
  often than in the original task's 1-3.
- Per-image hue shifts of up to 0.05 of the colour circle (`data.synthetic.hue_jitter`; the six
  hues are 1/6 apart): one image's colours are not another's, and a few labeled images cover few
  of the shifts.
- 10 of 290 training images labeled (1/29), 280 unlabeled (the original task's 35 steps an
  epoch, so the same 280 steps), 64 validation images, up to 80 px.
- Its own rendering seed, 29: the first seed from 26 (the issue that asked for the task) whose 10
  labeled images each hold every object class in at least 3 images, so that no class is absent
  from the labels and the gap is one that unlabeled images can close.
The model, schedule and source task (the original style, 9 classes, seed 1000: a pretraining
task of another style, as ImageNet is not VOC) are the original task's. The task was chosen on
`supervised` and `supervised_all_labels` runs alone, before any semi-supervised run on it, and is
not tuned after; BENCHMARKS.md ("A task in the paper's regime") gives the choice's runs. Shared
hues (`data.synthetic.colours`) and clutter (`data.synthetic.distractors`) were tried there and
left out: the demo's small MiT learns them too slowly for the all-labels ceiling to stay high.

The argument is `[METHOD][,ENCODER][,regime]`, as the demo's with the task: the base config's
method with its keys (`configs/learning.py:unimatch_v2`, `...:unimatch_v2_allspark,dinov2`:
UniMatch V2's recipe at the demo's AdamW rates and EMA cap, `demo.use_unimatch_v2`). Default
`allspark` on the original task. Every row derives from the base config
(`allspark_jax.experiments.learning.recipe_config`): on the default base the UniMatch V2 rows take
the demo's settings of that recipe; on a UniMatch V2 base the other methods' rows keep its
optimiser, teacher and views (the keys they read).
"""
from allspark_jax import method as method_lib
from allspark_jax.configs import default
from allspark_jax.configs import demo


# The task token of the argument and that task's settings (data.num_classes and `data.synthetic.*`
# keys; the module docstring): fixed before any semi-supervised run on it, never tuned after.
REGIME = "regime"
REGIME_TASK = dict(num_classes=7, seed=29, num_train=290, num_labeled=10, num_val=64, size=80,
                   colours=0, max_objects=4, distractors=0, hue_jitter=0.05)


def task_arg(arg: str) -> tuple[str | None, str]:
    """'[METHOD][,ENCODER][,regime]' (any order) -> (REGIME or None, the argument without it)."""
    parts = str(arg).split(",") if str(arg) else []
    if parts.count(REGIME) > 1:
        raise ValueError(f"configs/learning.py:{arg}: {REGIME!r} is given twice; give it once")
    return (REGIME if REGIME in parts else None), ",".join(p for p in parts if p != REGIME)


def get_config(arg: str = "allspark"):
    task, rest = task_arg(arg)
    try:
        _, method, encoder = default.config_arg(rest, "learning.py", ("mit", "dinov2"))
    except ValueError as e:  # named with the whole argument, the task among what it takes
        message = str(e).replace(f"configs/learning.py:{rest}:", f"configs/learning.py:{arg}:", 1)
        if "unknown method or encoder" in message:
            message += f"; or the task {REGIME!r}"
        raise ValueError(message) from None
    config = demo.get_config(rest)
    recipe = method in default.UNIMATCH_V2_METHODS  # AdamW at the demo's rates, its EMA cap
    if encoder == "dinov2" and not recipe:
        # one rate for every row and the source task: the demo's supervised one (the supervised
        # source task diverges at the semi-supervised demo's 0.1)
        config.optim.lr = 0.05
    config.data.synthetic.num_train = 320
    config.data.synthetic.num_labeled = 40  # 1/8 of the training images
    config.data.synthetic.num_val = 64
    config.data.synthetic.size = 80
    if task == REGIME:
        regime = dict(REGIME_TASK)
        config.data.num_classes = regime.pop("num_classes")
        config.data.synthetic.update(regime)
    config.train.epochs = 8
    if "train.warmup_epoch" not in method_lib.unread_keys(method):  # AllSpark's memory warm-up
        config.train.warmup_epoch = 2
    if not recipe and "train.ema_decay" not in method_lib.unread_keys(method):
        config.train.ema_decay = 0.99  # the EMA row: a teacher ~100 steps behind over 280 steps
    config.learning.pretrain_steps = 640
    config.learning.pretrain_num_classes = 9
    config.learning.pretrain_num_images = 640
    config.eval.progress_bar = False
    config.log_every_steps = 35
    # Evaluated and checkpointed once, at the end of each run.
    config.eval_every_steps = 10**9
    config.checkpoint_every_steps = 10**9
    config.keep_checkpoints = 1
    return config
