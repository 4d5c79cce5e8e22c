"""A first run on a 2-core CPU in a few minutes: a synthetic dataset and a small MiT.

    python main.py --config configs/demo.py --workdir /tmp/demo

The synthetic dataset (Pascal layout: shapes with per-class texture and colour, 5 classes incl.
background) is written into <workdir>/synthetic_data on the first run. The model is a MiT with
embed dims (16, 32, 64, 96), one block per stage and a 64-dim decoder, trained from scratch. The run
trains, evaluates (centre crops, one compiled shape) at the end of every few epochs, checkpoints,
and resumes if started again with the same workdir. Predicting background everywhere scores an
mIoU of 15.9 (79% of the labeled validation pixels are background); README.md gives the demo's.
The optional argument is the method with its keys (`configs/demo.py:semi`,
`configs/demo.py:supervised`, `configs/demo.py:unimatch_v2`); `--config.method=...` switches the
method of the AllSpark config, its AllSpark-only keys back at their defaults (UniMatch V2's methods
need the argument: their teacher and views are not the AllSpark config's).

`dinov2` in the argument (`configs/demo.py:dinov2`, `configs/demo.py:semi,dinov2`) trains a tiny
DINOv2 with a small DPT head instead, also from scratch (`DINOV2`, `DPT`), at lr 0.1 (supervised
0.05): 56 px crops
(4 x 4 tokens of 14 px; the stored position grid is that grid), evaluated as UniMatch V2 evaluates
(the 60 px centre crops resized to 56 px: the training crop's grid). The MiT-only keys keep their
defaults.

`unimatch_v2` and `unimatch_v2_allspark` (`configs/demo.py:unimatch_v2`,
`configs/demo.py:unimatch_v2_allspark,dinov2`) train the same models with UniMatch V2's recipe
(`use_unimatch_v2`: `default.use_unimatch_v2` with the demo's batch, crop and epochs): the EMA
teacher, two strong views with CutMix, losses per group of 2 images, AdamW at lr 3e-3 (lr_multi 1)
and the EMA cap 0.99 for tiny models from scratch (UNIMATCH_V2_LR, UNIMATCH_V2_EMA_DECAY).
"""
from allspark_jax import method as method_lib
from allspark_jax.configs import default


# The tiny DINOv2 of `configs/demo.py:dinov2` (DINOv2Config fields) and its DPT head (DPTConfig's).
DINOV2 = dict(embed_dim=64, depth=4, num_heads=4, pos_grid=4)
DPT = dict(features=32, out_channels=(16, 32, 64, 64), layers=(0, 1, 2, 3))
DINOV2_CROP = 56
# UniMatch V2's recipe on the demo (`configs/demo.py:unimatch_v2`): AdamW rates (encoder lr,
# lr_multi) for the tiny models from scratch, per encoder family, and the EMA teacher's cap, chosen
# on the demo's 384 steps (README); UniMatch V2's own rates are for pretrained encoders, and its cap
# (0.996) averages the teacher over ~250 steps, most of this run.
UNIMATCH_V2_LR = {"mit": (3e-3, 1.0), "dinov2": (3e-3, 1.0)}
UNIMATCH_V2_EMA_DECAY = 0.99


def use_unimatch_v2(config, method: str) -> None:
    """UniMatch V2's recipe for `method` (`default.use_unimatch_v2`) on the demo's model (its
    `model.encoder` set before) with the demo's rates (UNIMATCH_V2_LR, UNIMATCH_V2_EMA_DECAY); the
    demo's batch, crop and epochs stay."""
    default.use_unimatch_v2(config, method)
    config.optim.lr, config.optim.lr_multi = UNIMATCH_V2_LR[config.model.encoder]
    config.train.ema_decay = UNIMATCH_V2_EMA_DECAY


def get_config(arg: str = "allspark"):
    _, method, encoder = default.config_arg(arg, "demo.py", ("mit", "dinov2"))
    config = default.get_config()
    config.method = method
    config.data.name = "synthetic"
    config.data.root = None  # written into <workdir>/synthetic_data
    config.data.split = "default"
    config.data.num_classes = 5
    config.data.crop_size = 64
    config.data.batch_size = 8
    config.data.labeled_strong = False  # a tiny model learns faster without colour jitter
    config.data.synthetic.num_train = 168
    config.data.synthetic.num_labeled = 40
    config.data.synthetic.num_val = 24
    config.data.synthetic.size = 80
    del config.model.backbone  # a preset name in default.py; a dict of fields here
    if encoder == "dinov2":
        config.model.encoder = "dinov2"
        config.model.backbone = dict(DINOV2)
        config.model.dpt.update(DPT)
        config.data.crop_size = DINOV2_CROP
    else:
        config.model.backbone = dict(embed_dims=(16, 32, 64, 96), depths=(1, 1, 1, 1),
                                     num_heads=(1, 2, 4, 6))
        config.model.drop_path_rate = 0.0
        config.model.decoder_dim = 64
    config.model.pretrained = None
    config.optim.lr = 0.01
    if encoder == "dinov2":
        # SGD from scratch: the ViT needs 10x the MiT's rate to learn in the demo's 384 steps
        # (README); supervised half that, as semi's and AllSpark's loss (loss_x + loss_u) / 2
        # halves the labeled loss's gradient (labeled alone it diverges at 0.1).
        config.optim.lr = 0.05 if method == "supervised" else 0.1
    config.optim.lr_multi = 1.0
    config.train.epochs = 24
    if "train.warmup_epoch" not in method_lib.unread_keys(method):  # AllSpark's memory warm-up
        config.train.warmup_epoch = 4
    config.eval.mode = "center_crop"
    config.eval.crop_size = 60  # every val image is at least 0.75 * 80 = 60 px on each side
    if method in default.UNIMATCH_V2_METHODS:
        use_unimatch_v2(config, method)
    config.log_every_steps = 16
    config.eval_every_steps = 96
    config.checkpoint_every_steps = 96
    return config
