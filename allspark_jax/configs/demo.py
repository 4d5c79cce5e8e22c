"""A first run on a 2-core CPU in a few minutes: a synthetic dataset and a small MiT.

    python main.py --config configs/demo.py --workdir /tmp/demo

The synthetic dataset (Pascal layout: shapes with per-class texture and colour, 5 classes incl.
background) is written into <workdir>/synthetic_data on the first run. The model is a MiT with
embed dims (16, 32, 64, 96), one block per stage and a 64-dim decoder, trained from scratch. The run
trains, evaluates (centre crops, one compiled shape) at the end of every few epochs, checkpoints,
and resumes if started again with the same workdir. Predicting background everywhere scores an
mIoU of 15.9 (79% of the labeled validation pixels are background); README.md gives the demo's.
The optional argument is the method with its keys (`configs/demo.py:semi`,
`configs/demo.py:supervised`); `--config.method=...` switches the method of the AllSpark config,
its AllSpark-only keys back at their defaults.

`dinov2` in the argument (`configs/demo.py:dinov2`, `configs/demo.py:semi,dinov2`) trains a tiny
DINOv2 with a small DPT head instead, also from scratch (`DINOV2`, `DPT`), at lr 0.1 (supervised
0.05): 56 px crops
(4 x 4 tokens of 14 px; the stored position grid is that grid), evaluated as UniMatch V2 evaluates
(the 60 px centre crops resized to 56 px: the training crop's grid). The MiT-only keys keep their
defaults.
"""
from allspark_jax.configs import default


# The tiny DINOv2 of `configs/demo.py:dinov2` (DINOv2Config fields) and its DPT head (DPTConfig's).
DINOV2 = dict(embed_dim=64, depth=4, num_heads=4, pos_grid=4)
DPT = dict(features=32, out_channels=(16, 32, 64, 64), layers=(0, 1, 2, 3))
DINOV2_CROP = 56


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
    if method == "allspark":  # the Semantic Memory's warm-up (the baselines have no memory)
        config.train.warmup_epoch = 4
    config.eval.mode = "center_crop"
    config.eval.crop_size = 60  # every val image is at least 0.75 * 80 = 60 px on each side
    config.log_every_steps = 16
    config.eval_every_steps = 96
    config.checkpoint_every_steps = 96
    return config
