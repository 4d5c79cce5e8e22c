"""Cityscapes (paper: 19 classes, crop 801, 240 epochs, lr 0.005, lr_multi 1, OHEM(0.7, 200000),
warm-up 15, sliding-window evaluation).

    python main.py --config configs/cityscapes.py:1_16 --workdir /tmp/cs_1_16 --config.data.root=/data/cityscapes

The argument is the split: '1_30', '1_16', '1_8', '1_4', '1_2'. The release's 4 GPUs each rank their
own pixels for OHEM: `--config.train.loss_groups=4` reproduces that exactly (the default 1 ranks the
global batch's pixels with min_kept 200000 for the whole batch).

A second argument picks the method with the release's hyperparameters for it
(`configs/cityscapes.py:1_16,semi`, `...:1_16,supervised`): both baselines train at lr 0.001
(AllSpark 0.005), the supervised one at global batch 16 (4 / GPU x 4 GPUs); loss_x is OHEM for all
three, loss_u CE. UniMatch V2's methods: the last paragraph.

An encoder argument puts the run on DINOv2 with UniMatch V2's DPT head (`configs/cityscapes.py:
1_16,dinov2_base`, `...:1_16,semi,dinov2_small`; sizes small / base / large / giant; 'mit', the
default, is the release's MiT-B5). UniMatch V2's settings then: crop 798 (57 patches), 180
epochs, `pretrained/dinov2_vit{s,b,l,g}14_pretrain.pth` as the encoder's start, and its
sliding-window evaluation with 798 px windows (multiples of 14, so the model runs each window at
its own size; `eval.buckets` stays the canvas of the window sums, which the model never sees).
The method's settings stay the release's: SGD at lr 0.005 (baselines 0.001) x lr_multi 1, the
global batch (8; supervised 16), OHEM(0.7, 200000), warm-up 15 epochs.

The methods 'unimatch_v2' and 'unimatch_v2_allspark'
(`configs/cityscapes.py:1_16,unimatch_v2,dinov2_base`, `...:1_16,unimatch_v2_allspark`) train with
UniMatch V2's recipe (`default.use_unimatch_v2`) and its cityscapes.yaml: global batch 8 (2 / GPU x
4 GPUs, the losses and OHEM's ranking per GPU's 2, min_kept 200000 each), crop 798, 180 epochs,
OHEM(0.7, 200000), AdamW (betas 0.9 / 0.999, weight decay 0.01) at 5e-6 x lr_multi 40 on DINOv2, the
EMA teacher capped at 0.996, confidence threshold 0.95, two strong views with CutMix 0.5, no
photometric augmentation of labeled images, and its sliding-window evaluation in 798 px windows. On
MiT-B5 (the release's SegFormer head) at 1e-5 x 10, the rates of UniMatch V2's only MiT-B5 run
(Pascal). 'unimatch_v2_allspark' keeps AllSpark's warm-up, 15 epochs.
"""
from allspark_jax import method as method_lib
from allspark_jax.configs import default

SPLITS = ("1_30", "1_16", "1_8", "1_4", "1_2")
# UniMatch V2's Cityscapes crop (57 patches of 14 px) and epochs (its cityscapes.yaml), on DINOv2
# and under its recipe.
UNIMATCH_V2_CROP, UNIMATCH_V2_EPOCHS = 798, 180


def get_config(arg: str = "1_16"):
    split, method, encoder = default.config_arg(arg, "cityscapes.py", default.DATASET_ENCODERS,
                                                SPLITS)
    config = default.get_config()
    config.method = method
    config.data.name = "cityscapes"
    config.data.root = "data/cityscapes"
    config.data.split = split
    config.data.num_classes = 19
    config.data.crop_size = 801
    # global: 2 / GPU x 4 GPUs; the release's supervised baseline 4 / GPU x 4 GPUs
    config.data.batch_size = 16 if method == "supervised" else 8
    config.model.backbone = "b5"
    config.model.pretrained = "pretrained/mit_b5.pth"
    config.optim.lr = 0.005 if method == "allspark" else 0.001  # the baselines' yaml: 0.001
    config.optim.lr_multi = 1.0
    config.train.epochs = 240
    if "train.warmup_epoch" not in method_lib.unread_keys(method):  # AllSpark's memory warm-up
        config.train.warmup_epoch = 15
    config.train.loss_x = "ohem"
    config.train.ohem_thresh = 0.7
    config.train.ohem_min_kept = 200000
    config.eval.mode = "sliding_window"
    config.eval.buckets = ((1024, 2048),)  # the canvas of the window sums
    if encoder != "mit":
        # the windows: eval.crop_size None follows the 798 px crop
        default.use_dinov2(config, encoder, crop_size=UNIMATCH_V2_CROP, epochs=UNIMATCH_V2_EPOCHS)
    if method in default.UNIMATCH_V2_METHODS:
        # its cityscapes.yaml: 2 / GPU x 4 GPUs, OHEM(0.7, 200000) (loss_x above), 798 px crops
        # and sliding windows (its trainer: 'sliding_window' if cityscapes; windows of the crop)
        default.use_unimatch_v2(config, method, batch_per_gpu=2, crop_size=UNIMATCH_V2_CROP,
                                epochs=UNIMATCH_V2_EPOCHS)
    return config
