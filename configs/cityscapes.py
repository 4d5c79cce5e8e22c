"""Cityscapes (paper: 19 classes, crop 801, 240 epochs, lr 0.005, lr_multi 1, OHEM(0.7, 200000),
warm-up 15, sliding-window evaluation).

    python main.py --config configs/cityscapes.py:1_16 --workdir /tmp/cs_1_16 --config.data.root=/data/cityscapes

The argument is the split: '1_30', '1_16', '1_8', '1_4', '1_2'. The release's 4 GPUs each rank their
own pixels for OHEM: `--config.train.loss_groups=4` reproduces that exactly (the default 1 ranks the
global batch's pixels with min_kept 200000 for the whole batch).
"""
from configs import default

SPLITS = ("1_30", "1_16", "1_8", "1_4", "1_2")


def get_config(split: str = "1_16"):
    if split not in SPLITS:
        raise ValueError(f"configs/cityscapes.py:{split}: unknown split; expected one of {', '.join(SPLITS)}")
    config = default.get_config()
    config.data.name = "cityscapes"
    config.data.root = "data/cityscapes"
    config.data.split = split
    config.data.num_classes = 19
    config.data.crop_size = 801
    config.data.batch_size = 8  # global: 2 / GPU x 4 GPUs
    config.model.backbone = "b5"
    config.model.pretrained = "pretrained/mit_b5.pth"
    config.optim.lr = 0.005
    config.optim.lr_multi = 1.0
    config.train.epochs = 240
    config.train.warmup_epoch = 15
    config.train.loss_x = "ohem"
    config.train.ohem_thresh = 0.7
    config.train.ohem_min_kept = 200000
    config.eval.mode = "sliding_window"
    config.eval.buckets = ((1024, 2048),)  # the canvas of the window sums
    return config
