"""COCO (paper: 81 classes incl. background, crop 513, 10 epochs, global batch 16 = 4 / GPU x 4 GPUs,
lr 0.001, lr_multi 10, CE, whole-image evaluation).

    python main.py --config configs/coco.py:1_512 --workdir /tmp/coco_1_512 --config.data.root=/data/coco

The argument is the split: '1_512', '1_256', '1_128', '1_64', '1_32'. The unlabeled set is every
train2017 image not in the labeled list. The released COCO config sets no `warmup_epoch` (the
release's code would fail reading it); we use 1 epoch (10% of the run, the same fraction of the
schedule as Pascal's 5 of 80 is 6%, Cityscapes' 15 of 240 is 6%; COCO's epochs are ~8x longer).
"""
from configs import default

SPLITS = ("1_512", "1_256", "1_128", "1_64", "1_32")


def get_config(split: str = "1_512"):
    if split not in SPLITS:
        raise ValueError(f"configs/coco.py:{split}: unknown split; expected one of {', '.join(SPLITS)}")
    config = default.get_config()
    config.data.name = "coco"
    config.data.root = "data/coco"
    config.data.split = split
    config.data.num_classes = 81
    config.data.crop_size = 513
    config.data.batch_size = 16  # global: 4 / GPU x 4 GPUs
    config.model.backbone = "b5"
    config.model.pretrained = "pretrained/mit_b5.pth"
    config.optim.lr = 0.001
    config.optim.lr_multi = 10.0
    config.train.epochs = 10
    config.train.warmup_epoch = 1  # not in the release (see the module docstring)
    config.train.loss_x = "ce"
    config.eval.mode = "original"
    config.eval.buckets = (640,)  # COCO images are at most 640 x 640
    return config
