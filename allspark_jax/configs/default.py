"""Default configuration: every key the code reads, with its meaning. The ONLY place hyperparameters live.

Dataset configs (`pascal.py`, `cityscapes.py`, `coco.py`, `demo.py`) start from `get_config()` here and
change what the paper changes (for UniMatch V2's methods, what its yaml files change). Override
anything on the command line:

    python main.py --config configs/pascal.py:1_16 --workdir /tmp/voc --config.optim.lr=0.002

(`configs/NAME.py` and `NAME` both name the config shipped here as allspark_jax/configs/NAME.py.)

Batch sizes are GLOBAL (summed over every device of every host). The paper trains on 4 GPUs with
2 labeled + 2 unlabeled images each (COCO 4 + 4): global `data.batch_size` 8 (COCO 16); UniMatch
V2 also on 4 GPUs, 4 + 4 each (Cityscapes 2 + 2): 16 (Cityscapes 8). With a different global batch
B, scale the learning rate linearly, `optim.lr = paper_lr * B / paper_B` (the recipes were only
tuned at their batch; keep it when you can). `train.loss_groups = 4` (UniMatch V2's methods set
it) computes the losses (and OHEM's ranking) per group of B/4 images and averages, as the 4 DDP
processes each average over their own pixels; 1 = one average over the batch.

`method` picks one of the release's three trainers: 'allspark' (train_allspark.py), 'semi'
(train_baseline_semi.py: the same self-training with the SegFormer head straight on the encoder) and
'supervised' (train_baseline_sup.py: labeled images only), or UniMatch V2's recipe (its
unimatch_v2.py: an EMA teacher, two strong views each with its CutMix box, complementary dropout,
AdamW): 'unimatch_v2', and 'unimatch_v2_allspark', this project's combination, AllSpark's module in
its student and teacher. The dataset configs take it as a second argument
(`configs/pascal.py:1_16,supervised`, `configs/pascal.py:92,unimatch_v2`) and then also set that
trainer's hyperparameters (the release's; UniMatch V2's: `use_unimatch_v2`), and the encoder as
another (`configs/pascal.py:1_16,semi,dinov2_base`: `config_arg`, `use_dinov2`);
`--config.method=semi` switches the method and keeps every other key but those the new method does
not read, which go back to their values here unless the command line sets them too
(`allspark_jax.commands.config_flag`). UniMatch V2's methods need its teacher and views
(`train.teacher='ema'`, `data.student_view='strong'`), which the defaults here are not: on another
method's config `--config.method=unimatch_v2` is refused with that message; give the argument. A key
that the method does not read (AllSpark's own under 'semi' / 'supervised' / 'unimatch_v2', the
unlabeled-data keys under 'supervised': `allspark_jax.method.unread_keys`) must keep its value here,
else validation names it. So must a key that another key's value leaves unread
(`allspark_jax.config.unread.unread_by_setting`: OHEM's keys under loss_x 'ce', profile_* without
profile, data.tfds_data_dir without source 'tfds', optim.momentum under 'adamw', optim.betas under
'sgd', the MiT-only / DINOv2-only model keys under the other encoder).
"""
import ml_collections
from ml_collections.config_dict import placeholder

from allspark_jax import method as method_lib
from allspark_jax.method import METHODS


# facebookresearch's DINOv2 encoders (`dinov2_vit{s,b,l,g}14_pretrain.pth`, the files UniMatch V2
# loads as its backbone) by size, the sizes of `allspark_jax.models.dinov2.DINOV2_PRESETS`.
DINOV2_CHECKPOINTS = {"small": "dinov2_vits14_pretrain.pth", "base": "dinov2_vitb14_pretrain.pth",
                      "large": "dinov2_vitl14_pretrain.pth", "giant": "dinov2_vitg14_pretrain.pth"}
# The dataset configs' encoder arguments: the release's MiT-B5, or a DINOv2 size with UniMatch V2's
# DPT head (`use_dinov2`).
DATASET_ENCODERS = ("mit",) + tuple(f"dinov2_{size}" for size in DINOV2_CHECKPOINTS)


def config_arg(arg: str, config_file: str, encoders, splits=None) -> tuple[str | None, str, str]:
    """A shipped config's argument -> (split, method, encoder); anything unknown -> ValueError.

    The argument is 'SPLIT[,METHOD][,ENCODER]' for a config with `splits` (the split first), else
    '[METHOD][,ENCODER]'; METHOD and ENCODER may come in either order, each at most once;
    defaults 'allspark' and 'mit' (split None without `splits`).
    """
    spec = f"configs/{config_file}:{arg}"
    parts = str(arg).split(",") if str(arg) else []
    split = None
    if splits is not None:
        split = parts.pop(0) if parts else ""
        if split not in splits:
            raise ValueError(f"{spec}: unknown split {split!r}; expected one of {', '.join(splits)}")
    method = encoder = None
    for part in parts:
        if part in METHODS and method is None:
            method = part
        elif part in encoders and encoder is None:
            encoder = part
        elif part in METHODS or part in encoders:
            raise ValueError(f"{spec}: {part!r} is a second "
                             f"{'method' if part in METHODS else 'encoder'}; give one")
        else:
            raise ValueError(f"{spec}: unknown method or encoder {part!r}; expected a method "
                             f"({', '.join(METHODS)}) or an encoder ({', '.join(encoders)})")
    return split, method or "allspark", encoder or "mit"


def use_dinov2(config, encoder: str, *, crop_size: int, epochs: int, buckets=None) -> None:
    """A dataset config on the DINOv2 encoder `encoder` ('dinov2_SIZE') with UniMatch V2's DPT head
    of that size, as UniMatch V2 trains and evaluates it: its training crop (a multiple of the
    14-px patch) and epochs, its `dinov2_vit*14_pretrain.pth` encoder as `model.pretrained`, and
    `buckets` (None: the config's) for whole images: multiples of 14 holding the dataset's images,
    so that each bucket's evaluation size (`models.dpt.eval_input_size`, the program's canvas) is
    the bucket itself. The rest (the method's optimiser, batch, loss, warm-up; the evaluation
    mode) stays the config's; the MiT-only keys keep their defaults, as validation requires."""
    size = encoder.removeprefix("dinov2_")
    if size not in DINOV2_CHECKPOINTS:
        raise ValueError(f"unknown DINOv2 encoder {encoder!r}; expected one of "
                         f"{', '.join(DATASET_ENCODERS[1:])}")
    config.model.encoder = "dinov2"
    config.model.backbone = size  # UniMatch V2's DPT head of this size (model.dpt.* None)
    config.model.pretrained = f"pretrained/{DINOV2_CHECKPOINTS[size]}"
    config.data.crop_size = crop_size
    config.train.epochs = epochs
    if buckets is not None:
        config.eval.buckets = buckets


# UniMatch V2's AdamW rates per encoder family: (encoder lr, lr_multi for the rest). 'dinov2': its
# configs/{pascal,cityscapes,coco}.yaml (the same on every dataset and batch). 'mit': its only MiT
# run, MiT-B5 on Pascal with 183 labels (the log of its table 9: pascal.yaml's values but lr 1e-5
# and lr_multi 10, at crop 518), which put a DPT head of its own on the MiT; here the MiT keeps
# the release's SegFormer head, at that log's rates on every dataset.
UNIMATCH_V2_LR = {"dinov2": (5e-6, 40.0), "mit": (1e-5, 10.0)}
# The methods that train with UniMatch V2's recipe (`allspark_jax.method`): `use_unimatch_v2`.
UNIMATCH_V2_METHODS = tuple(
    m for m in METHODS if method_lib.resolve(m, teacher="ema", student_view="strong",
                                             cutmix_prob=0.5).recipe == "unimatch_v2")
# The GPUs its yaml files count ("per GPU x 4 GPUs"): its losses average per GPU.
UNIMATCH_V2_GPUS = 4


def use_unimatch_v2(config, method: str, *, batch_per_gpu: int | None = None,
                    crop_size: int | None = None, epochs: int | None = None) -> None:
    """UniMatch V2's recipe (its `unimatch_v2.py`) on a config for `method` ('unimatch_v2' |
    'unimatch_v2_allspark'), with the rates of the config's encoder family (`model.encoder`, set
    before: `use_dinov2`) from UNIMATCH_V2_LR.

    Sets AdamW (betas (0.9, 0.999), weight decay 0.01), the EMA teacher (decay min(1 - 1/(t+1),
    0.996)), confidence threshold 0.95, the strong student views with CutMix probability 0.5,
    padding out of loss_u (its ignore mask), no photometric augmentation of labeled images (its
    SemiDataset's train_l), and the losses averaged per group of one GPU's images
    (`train.loss_groups` UNIMATCH_V2_GPUS). The dataset's values of its yaml file, where given:
    `batch_per_gpu` (its `batch_size`; `data.batch_size` becomes the global batch, x
    UNIMATCH_V2_GPUS), `crop_size`, `epochs`. The rest stays the config's: loss_x (its criterion),
    evaluation, the scale range, and AllSpark's warm-up and key groups (read by
    'unimatch_v2_allspark' only; the other keys it does not read keep their defaults).
    """
    if method not in UNIMATCH_V2_METHODS:
        raise ValueError(f"method {method!r} does not train with UniMatch V2's recipe; expected "
                         f"one of {', '.join(UNIMATCH_V2_METHODS)}")
    config.method = method
    config.optim.name = "adamw"
    config.optim.lr, config.optim.lr_multi = UNIMATCH_V2_LR[config.model.encoder]
    config.optim.betas = (0.9, 0.999)
    config.optim.weight_decay = 0.01
    config.train.teacher = "ema"
    config.train.ema_decay = 0.996  # the cap of its schedule
    config.train.conf_thresh = 0.95
    config.train.loss_u_ignore_padding = True
    config.train.loss_groups = UNIMATCH_V2_GPUS
    config.data.student_view = "strong"
    config.data.cutmix_prob = 0.5
    config.data.labeled_strong = False
    if batch_per_gpu is not None:
        config.data.batch_size = batch_per_gpu * UNIMATCH_V2_GPUS
    if crop_size is not None:
        config.data.crop_size = crop_size
    if epochs is not None:
        config.train.epochs = epochs


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 0  # PRNG seed: model init, dropout / stochastic depth, data order and augmentation.
    # 'allspark' | 'semi' | 'supervised' | 'unimatch_v2' | 'unimatch_v2_allspark' (see the module
    # docstring and allspark_jax.method).
    config.method = "allspark"

    # ------------------------------------------------------------------------------------- data
    config.data = data = ml_collections.ConfigDict()
    data.name = "pascal"  # 'pascal' | 'cityscapes' | 'coco' | 'synthetic' | 'custom' (your own layout).
    # placeholder(str): None by default, and a path can still be given with --config.KEY=VALUE.
    data.root = placeholder(str)  # Data root in the official layout (split lines are relative to it).
    data.split = "1_16"  # Split name (e.g. '92'..'1464', '1_16'..'1_2', 'u2pl_1_8') or a labeled list path.
    data.unlabeled_split = placeholder(str)  # Unlabeled list path / split name; None: the split's.
    data.val_split = "val"  # 'val' or the path of a validation list.
    data.num_classes = 21  # Classes incl. background (VOC 21, Cityscapes 19, COCO 81); checked.
    data.crop_size = 513  # Training crop side S.
    data.batch_size = 8  # GLOBAL labeled batch (unlabeled batch is the same); paper: 2/GPU x 4 GPUs.
    data.source = "files"  # 'files' (decode the root's files) | 'tfds' (allspark_jax.data.prepare records).
    data.tfds_data_dir = placeholder(str)  # TFDS data dir for source 'tfds' (None = TFDS default).
    data.student_view = "weak"  # 'weak' (release: student sees the teacher's view) | 'strong'.
    # Probability of a CutMix box per unlabeled image (release: 0, off): inside it the student sees
    # the neighbouring unlabeled image of the global batch and learns that image's pseudo-label.
    data.cutmix_prob = 0.0
    data.labeled_strong = True  # Strong photometric augmentation on labeled images (release: yes).
    data.scale_range = (0.5, 2.0)  # Random rescale range of the long side.
    data.check_files = "exist"  # Before reading: 'none' | 'exist' (files present) | 'decode' (all decoded).
    # Largest image or mask accepted, in pixels (height x width as its header declares it, checked
    # before decoding): a file claiming more fails naming it instead of taking gigabytes to decode.
    data.max_image_pixels = 100_000_000
    data.num_parallel_calls = -1  # tf.data map parallelism (-1 = AUTOTUNE).
    data.prefetch = 2  # Batches prefetched by tf.data (host) and to the devices.
    # Only for data.name == 'synthetic' with data.root None: the dataset written into
    # <workdir>/synthetic_data by allspark_jax.data.synthetic before the run.
    data.synthetic = ml_collections.ConfigDict(dict(
        num_train=64,  # Training images (labeled + unlabeled).
        num_labeled=16,  # Labeled among them.
        num_val=16,  # Validation images.
        size=64,  # Largest image side (each side drawn in [0.75 size, size]).
        seed=0,  # Rendering seed.
        # The images' style (allspark_jax.data.synthetic.Style); these defaults are the original
        # task's, configs/learning.py:regime the paper-regime task's.
        colours=0,  # Object hues: 0 one per class; N > 0 N hues, classes N apart sharing one.
        max_objects=3,  # Objects per image, 1..max_objects; later ones occlude earlier ones.
        distractors=0,  # Unstriped clutter shapes (labelled background) per image, 0..distractors.
        hue_jitter=0.0,  # Per-image shift of every object's hue, at most this fraction of the circle.
    ))

    # Only for data.name == 'custom' (data.split / unlabeled_split / val_split are then list files,
    # absolute or relative to data.root; unlabeled lines may hold the image alone).
    data.custom = ml_collections.ConfigDict(dict(
        class_names=placeholder(str),  # File of class names, one per line (line k: class k).
        palette=placeholder(str),  # Optional file of 'R G B' lines (class k on line k, then ignore).
        ignore_index=255,  # Mask value of ignored pixels (0..255, no class id).
    ))

    # ------------------------------------------------------------------------------------ model
    config.model = model = ml_collections.ConfigDict()
    # Encoder family: 'mit' (the release's MiT with the SegFormer head) | 'dinov2' (DINOv2 with
    # UniMatch V2's DPT head; AllSpark on the last map the head reads; training crops multiples of
    # 14; evaluation as UniMatch V2's: images resized to multiples of 14 and the logits back).
    model.encoder = "mit"
    # 'mit': a MiT preset 'b0'..'b5' or a dict of MiTConfig fields (embed_dims, depths, ...).
    # 'dinov2': a DINOv2 size 'small' | 'base' | 'large' | 'giant' or a dict of DINOv2Config fields.
    model.backbone = "b5"
    # The DPT head (encoder 'dinov2'): None = UniMatch V2's head of the backbone's size; required
    # for a backbone given by its fields. features: the fusion width; out_channels: the four maps'
    # projection widths; layers: the four encoder blocks read (increasing).
    model.dpt = ml_collections.ConfigDict(dict(
        features=placeholder(int), out_channels=placeholder(tuple), layers=placeholder(tuple)))
    # Stochastic depth of the MiT encoder; None = the preset's 0.1. (encoder 'mit')
    model.drop_path_rate = placeholder(float)
    model.num_classes = data.get_ref("num_classes")  # Output classes (follows data.num_classes).
    model.allspark_heads = 2  # AllSpark heads H (2 in every paper config; method 'allspark' only).
    model.decoder_dim = 768  # SegFormer head embedding dim E (encoder 'mit').
    model.head_dropout = 0.1  # Dropout2d before the SegFormer classifier (encoder 'mit').
    model.attn_drop = 0.1  # AllSpark attention dropout.
    model.proj_drop = 0.1  # AllSpark output projection dropout.
    # The AllSpark module's branch that predicts in evaluation and predict (methods with AllSpark
    # only; allspark_jax.models.allspark.BRANCHES; train.teacher_branch is the teacher pass's).
    # 'labeled' (the release's): the labeled-to-unlabeled attention with the image's own channels
    # as keys. The others are this project's extension, not the release's behaviour. 'unlabeled':
    # the unlabeled images' channel self-attention, the branch loss_u trains. 'memory': the labeled
    # branch with the Semantic Memory's channels as keys, as the student reads it after the
    # warm-up; it needs the training crop's token grid at evaluation (eval.mode 'center_crop' or
    # 'sliding_window' with a crop of that grid) and the online teacher (an EMA teacher has no
    # memory of its own).
    model.inference_branch = "labeled"
    model.dtype = "float32"  # Compute dtype: 'float32' | 'bfloat16' (params and logits stay float32).
    # Arithmetic of float32 matrix products and convolutions (JAX's jax_default_matmul_precision,
    # set at start-up by runtime.apply_precision for training, evaluation, predict and the
    # benchmark): 'default' | 'high' | 'highest'. 'default' is the backend's fast path: full float32
    # on CPU, TensorFloat-32 (10-bit mantissa inputs, about 1e-3 relative error) on NVIDIA GPUs since
    # Ampere, one bfloat16 pass on TPUs. 'high': three bfloat16 passes on TPUs (close to float32), TF32 on GPUs.
    # 'highest': full float32 everywhere (the release's matrix products; the verifier's tolerances).
    # bfloat16 operands (model.dtype='bfloat16') run in bfloat16 whatever this says.
    model.precision = "default"
    model.remat = False  # Rematerialise MiT blocks (saves activation memory, costs compute; 'mit').
    model.pretrained = placeholder(str)  # Encoder to start from, of model.encoder's family. 'mit':
    # SegFormer's ImageNet mit_b5.pth, or a Hugging Face SegformerModel /
    # SegformerForImageClassification directory, .safetensors or hub id. 'dinov2':
    # facebookresearch's dinov2_vit{s,b,l,g}14_pretrain.pth (UniMatch V2's start), or a Hugging Face
    # Dinov2Model directory, .safetensors or hub id (facebook/dinov2-small ...). Head and AllSpark
    # keep their initialisation.

    # -------------------------------------------------------------------------------- optimiser
    config.optim = optim = ml_collections.ConfigDict()
    # 'sgd' (the release's: SGD with momentum, PyTorch-coupled weight decay) | 'adamw' (UniMatch
    # V2's: PyTorch's AdamW, decoupled weight decay). Both: two learning-rate groups, poly schedule.
    optim.name = "sgd"
    optim.lr = 0.001  # Encoder learning rate at the paper's global batch (see the module docstring).
    optim.lr_multi = 10.0  # The rest (AllSpark + head) trains at lr * lr_multi.
    optim.momentum = 0.9  # SGD momentum (optim.name 'sgd').
    optim.betas = (0.9, 0.999)  # AdamW's moment decays (beta1, beta2) (optim.name 'adamw').
    # Weight decay on every parameter the forward applies: 'sgd' adds wd * p to the gradient
    # (PyTorch SGD); 'adamw' shrinks p by lr * wd each step (PyTorch AdamW; UniMatch V2: 0.01).
    optim.weight_decay = 1e-4
    optim.poly_power = 0.9  # Poly schedule lr * (1 - t / total)^power.

    # --------------------------------------------------------------------------------- training
    config.train = train = ml_collections.ConfigDict()
    # Epochs; an epoch walks the unlabeled list once (unlabeled // batch steps), with method
    # 'supervised' the labeled list (labeled // batch steps), as the release's trainers.
    train.epochs = 80
    train.num_train_steps = -1  # > 0: stop after this many steps (the schedule still spans `epochs`).
    train.warmup_epoch = 5  # AllSpark reads the Semantic Memory from this epoch on (before: batch keys).
    train.loss_x = "ce"  # Supervised loss: 'ce' | 'ohem'.
    train.ohem_thresh = 0.7  # OHEM probability threshold.
    train.ohem_min_kept = 200000  # OHEM minimum kept pixels (per loss group).
    train.loss_groups = 1  # Losses averaged per group of the batch; 4 = the release's 4 GPUs.
    train.teacher = "online"  # 'online' (release: the student itself in inference mode) | 'ema'.
    # EMA teacher decay (teacher == 'ema'). UniMatch V2's methods: the cap of its schedule, decay
    # min(1 - 1 / (t + 1), ema_decay) after step t (0.996 in its code).
    train.ema_decay = 0.999
    train.conf_thresh = 0.0  # Pseudo-label confidence threshold (release: 0 = every pixel).
    train.loss_u_ignore_padding = False  # Ignore padded pixels in loss_u (release: no).
    # AllSpark's labeled-to-unlabeled keys in the teacher pass and (before warmup_epoch) the
    # student's come from groups of this many images (release: one GPU's 2); None = the whole batch.
    train.key_group_size = placeholder(int)
    # The AllSpark branch of the teacher pass that makes the pseudo-labels (methods with AllSpark
    # only): 'labeled' (the release's: its key group's channels as keys), or this project's
    # extension 'unlabeled' / 'memory' (model.inference_branch's meanings; 'memory' is 'labeled'
    # before warmup_epoch, as the student's labeled branch then is, and needs the online teacher).
    train.teacher_branch = "labeled"
    train.progress_bar = True  # Console progress bar (main process): step, epoch, losses, img/s, ETA.
    train.stop_on_nan = True  # Stop at a non-finite loss or state; no such state is checkpointed.

    # ------------------------------------------------------------------------------- evaluation
    config.eval = ev = ml_collections.ConfigDict()
    ev.mode = "original"  # 'original' | 'center_crop' | 'sliding_window'.
    ev.crop_size = placeholder(int)  # center_crop / sliding_window side; None = data.crop_size.
    # Whole images ('original', and the canvas of sliding-window sums) run zero-padded in the
    # smallest of these (sides or (height, width) pairs) that holds them, each image's true size an
    # input of the program: one compilation per bucket, results equal to each image alone. An image
    # larger than every bucket runs in its own size rounded up to 128.
    # Pascal VOC images are at most 500 x 500, most of them 500 wide and at most 375 high, or the
    # transpose: a 384 x 512 and a 512 x 384 bucket hold those in 3/4 of the square's pixels.
    ev.buckets = ((384, 512), (512, 384), (512, 512))
    ev.batch_size = 8  # Images (or windows) per device in one evaluation program call.
    ev.best_of = "student"  # Which weights pick the 'best' checkpoint: 'student' | 'ema'.
    ev.progress_bar = True  # Console progress bar during evaluation.
    ev.max_images = -1  # > 0: evaluate only the first images (quick checks); -1 = all.

    # ----------------------------------------------------------------------- run loop / logging
    config.log_every_steps = 50  # Write losses, learning rates and throughput every this many steps; <= 0: every epoch.
    config.eval_every_steps = -1  # Evaluate every this many steps; <= 0: at the end of every epoch.
    config.checkpoint_every_steps = -1  # Save every this many steps; <= 0: end of every epoch.
    config.keep_checkpoints = 2  # How many of the latest checkpoints to keep (the best is kept apart).
    config.profile = False  # Record a profiler trace (TensorBoard) of a few steps.
    config.profile_first_step = 10  # First profiled step.
    config.profile_num_steps = 5  # Number of profiled steps.
    config.compilation_cache = False  # Persistent XLA compilation cache in <workdir>/jax_cache.
    # Appended to XLA_FLAGS before JAX starts (flags already in the environment win). XLA:CPU's
    # default concurrency-optimised scheduler runs independent work early, which keeps what the
    # backward pass needs from every block alive at once; turning it off lowers training memory.
    # xla_cpu_* flags affect only the CPU compiler and are appended only where JAX runs on the CPU
    # alone (JAX_PLATFORMS=cpu, or no GPU/TPU plugin installed).
    config.xla_flags = "--xla_cpu_enable_concurrency_optimized_scheduler=false"

    # ------------------------------------------------------------------------ learning benchmark
    # Read only by `python -m allspark_jax.experiments.learning` (data.name 'synthetic').
    config.learning = ml_collections.ConfigDict(dict(
        # > 0: first train a supervised model this many steps on a source task (a synthetic dataset
        # of other classes, every image labeled, none of its images in the compared task), then
        # start every run's encoder from its encoder (as model.pretrained: the paper's ImageNet
        # weights); 0: every run from random initialisation.
        pretrain_steps=0,
        pretrain_num_classes=9,  # Source task's classes incl. background (other shape/colour pairs).
        pretrain_num_images=640,  # Source task's training images (all labeled).
        pretrain_seed=1000,  # Source task's rendering and training seed (not data.synthetic.seed).
        # Source task's learning rate for every module (lr_multi 1: a supervised run from random
        # weights); None: optim.lr and optim.lr_multi, as the compared runs.
        pretrain_lr=placeholder(float),
    ))

    # ----------------------------------------------------------------------------- distribution
    config.shard_params = False  # Shard params / optimizer state over devices (ZeRO style).
    config.distributed = ml_collections.ConfigDict(dict(
        coordinator_address=placeholder(str),  # host:port of process 0, multi-host (or env ALLSPARK_*).
        num_processes=placeholder(int),  # Number of processes.
        process_id=placeholder(int),  # This process's id.
        auto=False,  # jax.distributed.initialize() with JAX's cluster auto-detection.
        # A process silent this long counts as dead: every other process then stops with an error.
        heartbeat_timeout_seconds=100,
        shutdown_timeout_seconds=300,  # At exit, how long a process waits for the others to finish.
    ))
    return config
