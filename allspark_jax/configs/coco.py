"""COCO (paper: 81 classes incl. background, crop 513, 10 epochs, global batch 16 = 4 / GPU x 4 GPUs,
lr 0.001, lr_multi 10, CE, whole-image evaluation).

    python main.py --config configs/coco.py:1_512 --workdir /tmp/coco_1_512 --config.data.root=/data/coco

The argument is the split: '1_512', '1_256', '1_128', '1_64', '1_32'. The unlabeled set is every
train2017 image not in the labeled list. The released COCO config sets no `warmup_epoch` (the
release's code would fail reading it); we use 1 epoch (10% of the run, the same fraction of the
schedule as Pascal's 5 of 80 is 6%, Cityscapes' 15 of 240 is 6%; COCO's epochs are ~8x longer).

A second argument picks the method with the release's hyperparameters for it
(`configs/coco.py:1_512,semi`, `...:1_512,supervised`): the baselines share AllSpark's except the
supervised global batch, 32 (8 / GPU x 4 GPUs). UniMatch V2's methods: the last paragraph.

An encoder argument puts the run on DINOv2 with UniMatch V2's DPT head (`configs/coco.py:1_512,
dinov2_base`, `...:1_512,semi,dinov2_small`; sizes small / base / large / giant; 'mit', the
default, is the release's MiT-B5). UniMatch V2's settings then: crop 518, 20 epochs,
`pretrained/dinov2_vit{s,b,l,g}14_pretrain.pth` as the encoder's start, whole-image evaluation as
UniMatch V2's (each image resized to a multiple of 14 and the logits back) in 14-multiple buckets.
The method's settings stay the release's: SGD at lr 0.001 x lr_multi 10, the global batch (16;
supervised 32), CE, warm-up 1 epoch.

The methods 'unimatch_v2' and 'unimatch_v2_allspark'
(`configs/coco.py:1_512,unimatch_v2,dinov2_base`, `...:1_512,unimatch_v2_allspark`) train with
UniMatch V2's recipe (`default.use_unimatch_v2`) and its coco.yaml: global batch 16 (4 / GPU x 4
GPUs, the losses averaged per GPU's 4), crop 518, 20 epochs, CE, AdamW (betas 0.9 / 0.999, weight
decay 0.01) at 5e-6 x lr_multi 40 on DINOv2, the EMA teacher capped at 0.996, confidence threshold
0.95, two strong views with CutMix 0.5, no photometric augmentation of labeled images, whole-image
evaluation. On MiT-B5 (the release's SegFormer head) at 1e-5 x 10, the rates of UniMatch V2's only
MiT-B5 run (Pascal). 'unimatch_v2_allspark' keeps the warm-up of 1 epoch.
"""
from allspark_jax import method as method_lib
from allspark_jax.configs import default

SPLITS = ("1_512", "1_256", "1_128", "1_64", "1_32")
# UniMatch V2's COCO crop and epochs (its coco.yaml), on DINOv2 and under its recipe.
UNIMATCH_V2_CROP, UNIMATCH_V2_EPOCHS = 518, 20


def get_config(arg: str = "1_512"):
    split, method, encoder = default.config_arg(arg, "coco.py", default.DATASET_ENCODERS, SPLITS)
    config = default.get_config()
    config.method = method
    config.data.name = "coco"
    config.data.root = "data/coco"
    config.data.split = split
    config.data.num_classes = 81
    config.data.crop_size = 513
    # global: 4 / GPU x 4 GPUs; the release's supervised baseline 8 / GPU x 4 GPUs
    config.data.batch_size = 32 if method == "supervised" else 16
    config.model.backbone = "b5"
    config.model.pretrained = "pretrained/mit_b5.pth"
    config.optim.lr = 0.001
    config.optim.lr_multi = 10.0
    config.train.epochs = 10
    if "train.warmup_epoch" not in method_lib.unread_keys(method):  # AllSpark's memory warm-up
        config.train.warmup_epoch = 1  # not in the release (see the module docstring)
    config.train.loss_x = "ce"
    config.eval.mode = "original"
    # COCO images are at most 640 x 640, most of them 640 x 480 or 480 x 640 (or smaller)
    config.eval.buckets = ((480, 640), (640, 480), (640, 640))
    if encoder != "mit":
        # 490 / 644 = 35 / 46 patches hold the 480 / 640 px sides
        default.use_dinov2(config, encoder, crop_size=UNIMATCH_V2_CROP, epochs=UNIMATCH_V2_EPOCHS,
                           buckets=((490, 644), (644, 490), (644, 644)))
    if method in default.UNIMATCH_V2_METHODS:  # its coco.yaml: 4 / GPU x 4 GPUs, CE
        default.use_unimatch_v2(config, method, batch_per_gpu=4, crop_size=UNIMATCH_V2_CROP,
                                epochs=UNIMATCH_V2_EPOCHS)
    return config
