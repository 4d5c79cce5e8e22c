"""Pascal VOC 2012 (paper: 21 classes, crop 513, 80 epochs, lr 0.001 x lr_multi 10, CE, warm-up 5).

    python main.py --config configs/pascal.py:1_16 --workdir /tmp/voc_1_16 --config.data.root=/data/VOC2012

The argument is the split: the "original" protocol '92', '183', '366', '732', '1464' (labeled images
from VOC's 1464 finely annotated ones), the "augmented"/blender protocol '1_16', '1_8', '1_4', '1_2'
(labeled from the 10582 SBD-augmented set), or U2PL's 'u2pl_1_16', 'u2pl_1_8', 'u2pl_1_4'. All use
the same data root (VOC2012 with SegmentationClass from SegmentationClassAug, as the release) and the
same 1449-image val list; AllSpark trains every Pascal split at crop 513 (UniMatch used 321 for the
original splits; AllSpark's released pascal config does not) and evaluates whole images.

A second argument picks the method with the release's hyperparameters for it
(`configs/pascal.py:1_16,semi`, `configs/pascal.py:1_16,supervised`): the baselines share AllSpark's
except the supervised global batch, 16 (4 / GPU x 4 GPUs).
"""
from allspark_jax.configs import default

ORIGINAL = ("92", "183", "366", "732", "1464")
AUGMENTED = ("1_16", "1_8", "1_4", "1_2", "u2pl_1_16", "u2pl_1_8", "u2pl_1_4")


def get_config(arg: str = "1_16"):
    split, method = default.split_and_method(arg, "pascal.py", ORIGINAL + AUGMENTED)
    config = default.get_config()
    config.method = method
    config.data.name = "pascal"
    config.data.root = "data/VOC2012"
    config.data.split = split
    config.data.num_classes = 21
    config.data.crop_size = 513
    # global: 2 / GPU x 4 GPUs; the release's supervised baseline 4 / GPU x 4 GPUs
    config.data.batch_size = 16 if method == "supervised" else 8
    config.model.backbone = "b5"
    config.model.pretrained = "pretrained/mit_b5.pth"
    config.optim.lr = 0.001
    config.optim.lr_multi = 10.0
    config.train.epochs = 80
    config.train.warmup_epoch = 5
    config.train.loss_x = "ce"
    config.eval.mode = "original"
    return config
