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
except the supervised global batch, 16 (4 / GPU x 4 GPUs). UniMatch V2's methods: the last
paragraph.

An encoder argument puts the run on DINOv2 with UniMatch V2's DPT head (`configs/pascal.py:92,
dinov2_base`, `...:1_16,semi,dinov2_small`; sizes small / base / large / giant; 'mit', the
default, is the release's MiT-B5). UniMatch V2's settings then: crop 518, 60 epochs,
`pretrained/dinov2_vit{s,b,l,g}14_pretrain.pth` as the encoder's start, whole-image evaluation as
UniMatch V2's (each image resized to a multiple of 14 and the logits back) in 14-multiple buckets.
The method's settings stay the release's: SGD at lr 0.001 x lr_multi 10, the global batch (8;
supervised 16), CE, warm-up 5 epochs.

The methods 'unimatch_v2' and 'unimatch_v2_allspark'
(`configs/pascal.py:92,unimatch_v2,dinov2_base`, `...:1_16,unimatch_v2_allspark`) train with
UniMatch V2's recipe (`default.use_unimatch_v2`) and its pascal.yaml: global batch 16 (4 / GPU x 4
GPUs, the losses averaged per GPU's 4), crop 518, 60 epochs, CE, AdamW (betas 0.9 / 0.999, weight
decay 0.01) at 5e-6 x lr_multi 40 on DINOv2, the EMA teacher capped at 0.996, confidence threshold
0.95, two strong views with CutMix 0.5, no photometric augmentation of labeled images, whole-image
evaluation. On MiT-B5 (the release's SegFormer head) at 1e-5 x 10, the rates of UniMatch V2's own
MiT-B5 run on Pascal (183 labels, crop 518, under a DPT head of its own). 'unimatch_v2_allspark'
keeps AllSpark's warm-up, 5 epochs.
"""
from allspark_jax.configs import default

ORIGINAL = ("92", "183", "366", "732", "1464")
AUGMENTED = ("1_16", "1_8", "1_4", "1_2", "u2pl_1_16", "u2pl_1_8", "u2pl_1_4")
# UniMatch V2's Pascal crop and epochs (its pascal.yaml; its MiT-B5 run's too), on DINOv2 and under
# its recipe.
UNIMATCH_V2_CROP, UNIMATCH_V2_EPOCHS = 518, 60


def get_config(arg: str = "1_16"):
    split, method, encoder = default.config_arg(arg, "pascal.py", default.DATASET_ENCODERS,
                                                ORIGINAL + AUGMENTED)
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
    if encoder != "mit":
        # 378 / 504 = 27 / 36 patches hold VOC's 375 / 500 px sides
        default.use_dinov2(config, encoder, crop_size=UNIMATCH_V2_CROP, epochs=UNIMATCH_V2_EPOCHS,
                           buckets=((378, 504), (504, 378), (504, 504)))
    if method in default.UNIMATCH_V2_METHODS:  # its pascal.yaml: 4 / GPU x 4 GPUs, CE
        default.use_unimatch_v2(config, method, batch_per_gpu=4, crop_size=UNIMATCH_V2_CROP,
                                epochs=UNIMATCH_V2_EPOCHS)
    return config
