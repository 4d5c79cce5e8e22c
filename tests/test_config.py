"""The config: shipped configs load by name from anywhere, files by path; every shipped config
validates; each bad value is named once; the method is resolved once."""
import os
import types

import pytest

from allspark_jax import errors
from allspark_jax import config as config_lib
from allspark_jax import method as method_lib
from allspark_jax import runtime
from allspark_jax import sharding
from allspark_jax.errors import DataError
from allspark_jax.experiments import learning
from conftest import make_config

CONFIGS = "configs"  # as a checkout's command lines name them: configs/NAME.py[:ARG]


@pytest.mark.parametrize("spec", ["default.py", "demo.py", "pascal.py:92", "pascal.py:u2pl_1_8",
                                  "cityscapes.py:1_30", "coco.py:1_512", "custom.py",
                                  "pascal.py:1_16,semi", "cityscapes.py:1_8,supervised",
                                  "coco.py:1_32,supervised", "pascal.py:1_16,unimatch_v2",
                                  "pascal.py:92,unimatch_v2_allspark,dinov2_base",
                                  "demo.py:unimatch_v2", "demo.py:unimatch_v2,dinov2",
                                  "learning.py:unimatch_v2_allspark", "learning.py:regime",
                                  "learning.py:semi,regime,dinov2"])
def test_shipped_configs_load_by_name_and_validate(spec):
    config = config_lib.load_config(os.path.join(CONFIGS, spec))
    config_lib.validate(config)


# The dataset configs' encoder argument: (spec, the same config on MiT, DINOv2 size, crop, epochs,
# eval mode, the dataset's largest images (height, width) that the buckets must hold).
DINOV2_SPECS = [
    ("pascal.py:92,dinov2_base", "pascal.py:92", "base", 518, 60, "original",
     [(375, 500), (500, 375), (500, 500)]),
    ("pascal.py:1_16,semi,dinov2_small", "pascal.py:1_16,semi", "small", 518, 60, "original",
     [(375, 500), (500, 375), (500, 500)]),
    ("coco.py:1_512,dinov2_large,supervised", "coco.py:1_512,supervised", "large", 518, 20,
     "original", [(480, 640), (640, 480), (640, 640)]),
    ("cityscapes.py:1_16,dinov2_giant", "cityscapes.py:1_16", "giant", 798, 180,
     "sliding_window", []),
    ("cityscapes.py:1_8,semi,dinov2_base", "cityscapes.py:1_8,semi", "base", 798, 180,
     "sliding_window", []),
]


@pytest.mark.parametrize("spec,mit_spec,size,crop,epochs,mode,largest", DINOV2_SPECS)
def test_dataset_configs_take_a_dinov2_encoder_with_unimatch_v2s_settings(
        spec, mit_spec, size, crop, epochs, mode, largest):
    from allspark_jax.configs import default
    from allspark_jax.evaluation import bucketing, predictor
    from allspark_jax.models import segmentor
    from allspark_jax.models.dinov2 import DINOv2Config
    from allspark_jax.models.dpt import DPTConfig, eval_input_size
    config = config_lib.load_config(os.path.join(CONFIGS, spec))
    config_lib.validate(config)
    mit = config_lib.load_config(os.path.join(CONFIGS, mit_spec))
    assert (config.model.encoder, config.model.backbone) == ("dinov2", size)
    assert config.model.pretrained == f"pretrained/dinov2_vit{size[0]}14_pretrain.pth"
    assert (config.data.crop_size, config.train.epochs, config.eval.mode) == (crop, epochs, mode)
    model = segmentor.model_config_from(config)
    assert model.backbone == DINOv2Config.preset(size)
    assert model.dpt == DPTConfig.preset(size, num_classes=config.data.num_classes)
    # the method's optimiser, batch, losses and warm-up stay the release's (the MiT config's)
    for key in ("method", "optim", "data.batch_size", "train.loss_x", "train.warmup_epoch",
                "train.ohem_min_kept", "train.conf_thresh", "eval.crop_size"):
        node, other = config, mit
        for part in key.split("."):
            node, other = node[part], other[part]
        assert node == other, key
    # the MiT-only keys are at their defaults (else validation refuses them)
    base = default.get_config()
    for key in ("decoder_dim", "head_dropout", "drop_path_rate", "remat"):
        assert config.model[key] == base.model[key], key
    if mode == "sliding_window":  # 798 px windows: 57 patches, run at their own size
        assert predictor.eval_crop_size(config) == 798 == eval_input_size((798,))[0]
        assert config.eval.buckets == mit.eval.buckets  # the canvas of the window sums
    for bucket in bucketing.as_buckets(config.eval.buckets) if largest else ():
        assert bucket[0] % 14 == 0 and bucket[1] % 14 == 0, bucket
    for image in largest:  # a bucket holds it, and runs in the bucket's own size
        bucket = bucketing.choose_bucket(image, config.eval.buckets)
        assert eval_input_size(bucket) == bucket


def test_the_encoder_argument_is_optional_and_checked():
    from allspark_jax.configs import default
    from allspark_jax.models.dinov2 import DINOV2_PRESETS
    assert set(default.DINOV2_CHECKPOINTS) == set(DINOV2_PRESETS)
    load = lambda spec: config_lib.load_config(os.path.join(CONFIGS, spec))  # noqa: E731
    assert load("pascal.py:1_16,mit").to_dict() == load("pascal.py:1_16").to_dict()
    assert (load("coco.py:1_32,dinov2_base,semi").to_dict()
            == load("coco.py:1_32,semi,dinov2_base").to_dict())
    for spec, message in [
            ("pascal.py:1_16,dinov2_huge", r"configs/pascal.py:1_16,dinov2_huge: unknown method "
             r"or encoder 'dinov2_huge'; expected a method \(allspark, semi, supervised, unimatch_v2, unimatch_v2_allspark\) or an "
             r"encoder \(mit, dinov2_small, dinov2_base, dinov2_large, dinov2_giant\)"),
            ("cityscapes.py:1_16,dinov2_base,dinov2_small",
             r"'dinov2_small' is a second encoder; give one"),
            ("coco.py:1_16,dinov2_base", r"configs/coco.py:1_16,dinov2_base: unknown split "
             r"'1_16'"),
            ("demo.py:dinov2_base", r"configs/demo.py:dinov2_base: unknown method or encoder "
             r"'dinov2_base'; expected a method \(allspark, semi, supervised, unimatch_v2, unimatch_v2_allspark\) or an encoder "
             r"\(mit, dinov2\)"),
            ("demo.py:semi,supervised", r"'supervised' is a second method")]:
        with pytest.raises(ValueError, match=message):
            load(spec)


@pytest.mark.parametrize("spec,method,lr", [("demo.py:dinov2", "allspark", 0.1),
                                            ("demo.py:semi,dinov2", "semi", 0.1),
                                            ("demo.py:dinov2,supervised", "supervised", 0.05),
                                            ("learning.py:dinov2", "allspark", 0.05)])
def test_the_demo_and_learning_configs_take_a_tiny_dinov2(spec, method, lr):
    from allspark_jax.configs import demo
    config = config_lib.load_config(os.path.join(CONFIGS, spec))
    config_lib.validate(config)
    assert (config.method, config.model.encoder) == (method, "dinov2")
    assert config.model.backbone.to_dict() == demo.DINOV2 and config.model.pretrained is None
    assert config.data.crop_size % 14 == 0 and config.model.dpt.layers == demo.DPT["layers"]
    assert config.optim.lr == lr


def test_shipped_configs_load_from_any_folder_and_by_file(tmp_path, monkeypatch):
    """`configs/NAME.py`, `NAME.py`, `NAME` and the package's own file all load the shipped config,
    wherever the process runs (an installed package has no configs/ folder beside it)."""
    import allspark_jax.configs
    monkeypatch.chdir(tmp_path)
    package_file = os.path.join(os.path.dirname(allspark_jax.configs.__file__), "pascal.py")
    loaded = [config_lib.load_config(spec).to_dict() for spec in (
        "configs/pascal.py:1_8", "pascal.py:1_8", "pascal:1_8", f"{package_file}:1_8")]
    assert all(c == loaded[0] for c in loaded) and loaded[0]["data"]["split"] == "1_8"
    assert config_lib.shipped_configs() == ("cityscapes", "coco", "custom", "default", "demo",
                                            "learning", "pascal")
    # a file of that name in the working folder is the user's: it wins
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "pascal.py").write_text(
        "from allspark_jax.configs import pascal\n\n"
        "def get_config(arg='1_16'):\n    c = pascal.get_config(arg)\n    c.seed = 7\n"
        "    return c\n")
    assert config_lib.load_config("configs/pascal.py:1_8").seed == 7


def test_a_users_config_files_elsewhere(tmp_path):
    """A config file of the user's own, alone or in a folder whose files import each other."""
    (tmp_path / "mine.py").write_text(
        "from allspark_jax.configs import demo\n\n"
        "def get_config():\n    c = demo.get_config()\n    c.seed = 3\n    return c\n")
    config = config_lib.load_config(str(tmp_path / "mine.py"))
    config_lib.validate(config)
    assert config.seed == 3 and config.data.name == "synthetic"
    folder = tmp_path / "my_allspark_configs"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    (folder / "base.py").write_text(
        "from allspark_jax.configs import default\n\n"
        "def get_config():\n    c = default.get_config()\n    c.seed = 4\n    return c\n")
    (folder / "child.py").write_text(
        "from my_allspark_configs import base\n\n"
        "def get_config(arg):\n    c = base.get_config()\n    c.data.split = arg\n    return c\n")
    config = config_lib.load_config(f"{folder / 'child.py'}:1_4")
    assert (config.seed, config.data.split) == (4, "1_4")


@pytest.mark.parametrize("key,value,message", [
    ("data.name", "imagenet", r"data.name='imagenet' is not a known dataset"),
    ("data.source", "lmdb", r"config.data.source='lmdb': expected one of 'files', 'tfds'"),
    ("data.cutmix_prob", 1.5, r"config.data.cutmix_prob=1.5: expected a number >= 0.0 and <= 1.0"),
    ("data.scale_range", (2.0, 0.5), r"config.data.scale_range"),
    ("data.custom.class_names", "names.txt",
     r"config.data.custom.class_names='names.txt': expected None: it is read only when data.name"),
    ("data.custom.ignore_index", 0, r"config.data.custom.ignore_index=0: expected 255: it is read only"),
    ("model.dtype", "float8", r"config.model.dtype='float8': expected one of"),
    ("model.backbone", "b9", r"config.model.backbone='b9': unknown MiT variant 'b9'; expected one "
                             r"of \['b0', 'b1', 'b2', 'b3', 'b4', 'b5'\]"),
    ("optim.lr", 0.0, r"config.optim.lr=0.0: expected a number > 0.0"),
    ("train.loss_x", "dice", r"config.train.loss_x='dice': expected one of 'ce', 'ohem'"),
    ("train.teacher", "mean", r"config.train.teacher='mean': expected one of 'online', 'ema'"),
    ("train.loss_groups", 3, r"config.train.loss_groups=3: expected a divisor of data.batch_size"),
    ("train.key_group_size", 5, r"config.train.key_group_size=5: expected None or a divisor"),
    ("eval.mode", "tiled", r"config.eval.mode='tiled': expected one of 'original'"),
    ("eval.best_of", "ema", r"config.eval.best_of='ema': expected 'student' unless"),
    ("keep_checkpoints", 0, r"config.keep_checkpoints=0: expected an integer >= 1"),
    ("data.check_files", "all", r"config.data.check_files='all': expected one of 'none', 'exist', "
                                r"'decode'"),
    ("method", "fixmatch", r"config.method='fixmatch': expected one of 'allspark', 'semi', "
                           r"'supervised'"),
    ("train.stop_on_nan", None, r"config.train.stop_on_nan=None: expected True or False"),
    ("model.remat", None, r"config.model.remat=None: expected True or False"),
    ("data.labeled_strong", None, r"config.data.labeled_strong=None: expected True or False"),
])
def test_bad_values_name_the_key_and_what_is_allowed(key, value, message):
    config = make_config()
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises((errors.ConfigError, DataError), match=message) as e:
        config_lib.validate(config)
    assert "\n" not in str(e.value)  # one line
    assert isinstance(e.value, DataError) == key.startswith("data.")


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(errors.ConfigError, match=r"nope.py' does not exist, and .* names no shipped "
                       r"config; expected a config file or one of cityscapes, coco, custom,"):
        config_lib.load_config(str(tmp_path / "nope.py"))
    with pytest.raises(errors.ConfigError, match=r"'configs/nope.py' names no shipped config"):
        config_lib.load_config("configs/nope.py")


def test_command_line_override_keys_and_values():
    config = make_config()
    config_lib.check_override_keys(config, ["optim.lr", "model.backbone", "data.synthetic.size"])
    with pytest.raises(errors.ConfigError, match=r"^config.optim.learning_rate is not a key; "
                                                     r"config.optim has: betas, lr, lr_multi, momentum,"):
        config_lib.check_override_keys(config, ["optim.lr", "optim.learning_rate"])
    with pytest.raises(errors.ConfigError, match=r"config.seed.x is not a key: config.seed is 0"):
        config_lib.check_override_keys(config, ["seed.x"])
    error = config_lib.override_value_error(config, "data.crop_size", "big", "invalid literal")
    assert str(error) == "config.data.crop_size='big': expected an integer (now 513)"
    # keys whose default is None have a type too (ml_collections placeholders)
    error = config_lib.override_value_error(config, "model.drop_path_rate", "x", "not a float")
    assert str(error) == "config.model.drop_path_rate='x': expected a number (now None)"
    # a group of keys is named by its keys, not dumped
    error = config_lib.override_value_error(config, "data.synthetic", "(1, 2)", "not a dict")
    assert str(error) == ("config.data.synthetic='(1, 2)': expected a group of keys; set them with "
                          "--config.data.synthetic.KEY=VALUE (config.data.synthetic has: "
                          "colours, distractors, hue_jitter, max_objects, num_labeled, num_train, "
                          "num_val, seed, size)")


def test_dataset_configs_give_each_method_the_release_hyperparameters():
    def load(spec):
        return config_lib.load_config(os.path.join(CONFIGS, spec))
    for spec, (method, batch, lr, lr_multi) in {
            "pascal.py:1_16": ("allspark", 8, 0.001, 10.0),
            "pascal.py:1_16,semi": ("semi", 8, 0.001, 10.0),
            "pascal.py:1_16,supervised": ("supervised", 16, 0.001, 10.0),
            "cityscapes.py:1_16": ("allspark", 8, 0.005, 1.0),
            "cityscapes.py:1_16,semi": ("semi", 8, 0.001, 1.0),
            "cityscapes.py:1_16,supervised": ("supervised", 16, 0.001, 1.0),
            "coco.py:1_512,supervised": ("supervised", 32, 0.001, 10.0)}.items():
        c = load(spec)
        assert (c.method, c.data.batch_size, c.optim.lr, c.optim.lr_multi) == (
            method, batch, lr, lr_multi), spec
    with pytest.raises(ValueError, match=r"pascal.py:1_16,mean_teacher: unknown method"):
        load("pascal.py:1_16,mean_teacher")


# UniMatch V2's yaml files (configs/{pascal,cityscapes,coco}.yaml of its release), per dataset:
# (per-GPU batch, crop, epochs, loss_x, eval mode); its runs use 4 GPUs. The warm-up is AllSpark's
# (the release's configs; COCO's is ours), read by unimatch_v2_allspark only.
UNIMATCH_V2_YAML = {"pascal": (4, 518, 60, "ce", "original", 5),
                    "cityscapes": (2, 798, 180, "ohem", "sliding_window", 15),
                    "coco": (4, 518, 20, "ce", "original", 1)}
# (encoder lr, lr_multi): its yaml files for DINOv2; its MiT-B5 run's log (table 9) for MiT.
UNIMATCH_V2_RATES = {"dinov2": (5e-6, 40.0), "mit": (1e-5, 10.0)}
UNIMATCH_V2_SPECS = ["pascal.py:1_16,unimatch_v2", "pascal.py:92,unimatch_v2_allspark,dinov2_base",
                     "pascal.py:183,dinov2_small,unimatch_v2", "cityscapes.py:1_16,unimatch_v2",
                     "cityscapes.py:1_8,unimatch_v2_allspark,dinov2_base",
                     "coco.py:1_512,unimatch_v2,dinov2_large", "coco.py:1_32,unimatch_v2_allspark"]


@pytest.mark.parametrize("spec", UNIMATCH_V2_SPECS)
def test_dataset_configs_take_unimatch_v2s_recipe_with_its_yaml_values(spec):
    """`configs/DATASET.py:SPLIT,unimatch_v2[_allspark][,ENCODER]`: UniMatch V2's unimatch_v2.py
    and its dataset's yaml, on either encoder; it validates, and the keys the method does not read
    keep their defaults."""
    from allspark_jax.configs import default
    from allspark_jax.evaluation import predictor
    config = config_lib.load_config(os.path.join(CONFIGS, spec))
    config_lib.validate(config)
    name = spec.split(".py")[0]
    method = next(p for p in spec.split(",") if p.startswith("unimatch_v2"))
    encoder = "dinov2" if "dinov2" in spec else "mit"
    per_gpu, crop, epochs, loss_x, mode, warmup = UNIMATCH_V2_YAML[name]
    resolved = method_lib.from_config(config)
    assert (resolved.name, resolved.recipe, resolved.allspark, resolved.ema, resolved.strong_views
            ) == (method, "unimatch_v2", method.endswith("allspark"), True, 2)
    assert config.model.encoder == encoder
    assert config.model.pretrained == ("pretrained/mit_b5.pth" if encoder == "mit" else
                                       f"pretrained/dinov2_vit{spec.split('dinov2_')[1][0]}14_pretrain.pth")
    # AdamW(betas=(0.9, 0.999), weight_decay=0.01), encoder lr and head lr x lr_multi, poly 0.9
    assert (config.optim.name, tuple(config.optim.betas), config.optim.weight_decay,
            config.optim.poly_power) == ("adamw", (0.9, 0.999), 0.01, 0.9)
    assert (config.optim.lr, config.optim.lr_multi) == UNIMATCH_V2_RATES[encoder]
    # the EMA teacher min(1 - 1/(t+1), 0.996); conf_thresh 0.95; the ignore mask (padding) out of
    # loss_u; two strong views, CutMix p 0.5; labeled images: resize, crop, flip only
    assert (config.train.teacher, config.train.ema_decay, config.train.conf_thresh,
            config.train.loss_u_ignore_padding) == ("ema", 0.996, 0.95, True)
    assert (config.data.student_view, config.data.cutmix_prob, config.data.labeled_strong,
            tuple(config.data.scale_range)) == ("strong", 0.5, False, (0.5, 2.0))
    # "batch_size: B # per GPU x 4 GPUs": the global batch, the losses averaged per GPU
    assert (config.data.batch_size, config.train.loss_groups) == (4 * per_gpu, 4)
    assert (config.data.crop_size, config.train.epochs, config.train.loss_x) == (crop, epochs, loss_x)
    if loss_x == "ohem":
        assert (config.train.ohem_thresh, config.train.ohem_min_kept) == (0.7, 200000)
    # its evaluation: 'sliding_window' on Cityscapes (windows of its crop), else whole images
    assert (config.eval.mode, predictor.eval_crop_size(config)) == (mode, crop)
    assert config.eval.best_of == "student"  # its best.pth: the student's mIoU
    base = default.get_config()
    assert config.train.warmup_epoch == (warmup if method.endswith("allspark")
                                         else base.train.warmup_epoch)
    assert config.train.key_group_size is None
    for key in method_lib.unread_keys(method):  # AllSpark's keys under 'unimatch_v2'
        *parents, leaf = key.split(".")
        assert _node(config, parents)[leaf] == _node(base, parents)[leaf], key


@pytest.mark.parametrize("spec", ["demo.py:unimatch_v2", "demo.py:unimatch_v2_allspark",
                                  "demo.py:unimatch_v2,dinov2", "demo.py:dinov2,unimatch_v2_allspark",
                                  "learning.py:unimatch_v2", "learning.py:unimatch_v2_allspark,dinov2"])
def test_the_demo_and_learning_configs_take_unimatch_v2s_recipe(spec):
    """The recipe on the demo's tiny models, at the demo's AdamW rates and EMA cap; the demo's
    (or the learning task's) batch, crop and epochs."""
    from allspark_jax.configs import demo
    config = config_lib.load_config(os.path.join(CONFIGS, spec))
    config_lib.validate(config)
    plain = config_lib.load_config(os.path.join(CONFIGS, spec.split(":")[0] + ":"
                                                + ("dinov2" if "dinov2" in spec else "mit")))
    method = next(p for p in spec.split(":")[1].split(",") if p.startswith("unimatch_v2"))
    encoder = "dinov2" if "dinov2" in spec else "mit"
    assert (config.method, config.model.encoder) == (method, encoder)
    assert (config.optim.name, config.train.teacher, config.data.student_view) == (
        "adamw", "ema", "strong")
    assert (config.optim.lr, config.optim.lr_multi) == demo.UNIMATCH_V2_LR[encoder]
    assert config.train.ema_decay == demo.UNIMATCH_V2_EMA_DECAY
    for key in ("data.batch_size", "data.crop_size", "train.epochs", "data.synthetic",
                "model.backbone", "eval.mode", "eval.crop_size"):
        *parents, leaf = key.split(".")
        assert _node(config, parents)[leaf] == _node(plain, parents)[leaf], key
    # AllSpark's warm-up (the demo's 4, the learning task's 2) for the AllSpark variant only
    assert config.train.warmup_epoch == (plain.train.warmup_epoch if method.endswith("allspark")
                                         else 5)


def test_unimatch_v2s_recipe_refuses_what_it_does_not_train_with():
    """One-line errors: two methods in an argument, the recipe without its teacher or strong views
    (a switched method), a key the method does not read, another method's recipe."""
    from allspark_jax.configs import default
    load = lambda spec: config_lib.load_config(os.path.join(CONFIGS, spec))  # noqa: E731
    with pytest.raises(ValueError, match=r"configs/pascal.py:1_16,unimatch_v2,semi: 'semi' is a "
                                         r"second method; give one"):
        load("pascal.py:1_16,unimatch_v2,semi")
    with pytest.raises(ValueError, match=r"configs/demo.py:unimatch_v2,unimatch_v2_allspark: "
                                         r"'unimatch_v2_allspark' is a second method"):
        load("demo.py:unimatch_v2,unimatch_v2_allspark")
    for key, value, message in [
            ("train.teacher", "online",
             r"^config.train.teacher='online': method 'unimatch_v2' \(UniMatch V2's recipe\) trains "
             r"with its EMA teacher; expected 'ema' \(the dataset configs' 'unimatch_v2' argument "
             r"sets the recipe, e.g. configs/pascal.py:1_16,unimatch_v2\)$"),
            ("data.student_view", "weak",
             r"^config.data.student_view='weak': method 'unimatch_v2' \(UniMatch V2's recipe\) "
             r"trains with strong views; expected 'strong'"),
            ("train.warmup_epoch", 4,
             r"^config.train.warmup_epoch=4: expected 5 \(its configs/default.py value\) with "
             r"method 'unimatch_v2': only AllSpark reads it"),
            ("optim.momentum", 0.8,
             r"^config.optim.momentum=0.8: expected 0.9 \(its configs/default.py value\): only "
             r"optim.name 'sgd' reads it \(optim.name='adamw'\)$")]:
        config = load("pascal.py:1_16,unimatch_v2")
        *parents, leaf = key.split(".")
        _node(config, parents)[leaf] = value
        with pytest.raises(errors.UserError, match=message) as e:
            config_lib.validate(config)
        assert "\n" not in str(e.value)
    # a config of the release's methods switched to the recipe keeps its online teacher: named
    switched = config_lib.with_method(load("cityscapes.py:1_16"), "unimatch_v2_allspark")
    with pytest.raises(errors.ConfigError, match=r"^config.train.teacher='online': method "
                                                 r"'unimatch_v2_allspark' \(UniMatch V2's recipe\)"):
        config_lib.validate(switched)
    with pytest.raises(ValueError, match=r"method 'semi' does not train with UniMatch V2's recipe; "
                                         r"expected one of unimatch_v2, unimatch_v2_allspark"):
        default.use_unimatch_v2(default.get_config(), "semi")


def test_every_config_the_readme_names_loads_and_validates():
    """README.md's commands and tables name configs with their arguments: each one builds and
    validates (a renamed split, method or encoder would leave the docs naming a config that
    fails)."""
    import re
    with open(os.path.join(os.path.dirname(__file__), os.pardir, "README.md")) as f:
        specs = set(re.findall(r"`(?:configs/)?((?:pascal|cityscapes|coco|demo|learning)\.py:"
                               r"[\w,]+)`", f.read()))
    assert {"pascal.py:92,unimatch_v2,dinov2_base", "pascal.py:183,unimatch_v2",
            "coco.py:1_32,unimatch_v2_allspark,dinov2_base", "demo.py:unimatch_v2"} <= specs
    for spec in sorted(specs):
        config_lib.validate(config_lib.load_config(os.path.join(CONFIGS, spec)))


@pytest.mark.parametrize("name,allspark,labeled_only", [
    ("allspark", True, False), ("semi", False, False), ("supervised", False, True),
    ("unimatch_v2", False, False), ("unimatch_v2_allspark", True, False)])
def test_the_method_is_resolved_once_from_the_config(name, allspark, labeled_only):
    """config.method and the self-training keys -> one Method; the model (its parameter tree) and
    the data options follow it."""
    from allspark_jax.models import segmentor
    config = make_config()
    config.method = name
    if not labeled_only:
        config.train.teacher, config.data.student_view, config.data.cutmix_prob = "ema", "strong", 0.5
    method = method_lib.from_config(config)
    assert (method.name, method.allspark, method.labeled_only) == (name, allspark, labeled_only)
    if labeled_only:  # no teacher, student view or CutMix to speak of
        assert (method.teacher, method.student_view, method.cutmix_prob, method.ema) == (
            None, None, 0.0, False)
    else:
        assert (method.teacher, method.student_view, method.cutmix_prob, method.ema) == (
            "ema", "strong", 0.5, True)
    assert segmentor.model_config_from(config).allspark == allspark
    assert set(method.unread_keys()) == set(method_lib.unread_keys(name))
    with pytest.raises(errors.ConfigError, match=r"config.method='mean_teacher': expected one of "
                                                 r"'allspark', 'semi', 'supervised'"):
        method_lib.resolve("mean_teacher", teacher="online", student_view="weak", cutmix_prob=0)


# A changed value of each key that only some methods read.
ALLSPARK_ONLY = [("model.allspark_heads", 4), ("model.attn_drop", 0.0), ("model.proj_drop", 0.2),
                 ("model.inference_branch", "unlabeled"), ("train.teacher_branch", "unlabeled"),
                 ("train.warmup_epoch", 2),
                 ("train.key_group_size", 4)]
UNLABELED_ONLY = [("data.unlabeled_split", "other/unlabeled.txt"), ("data.student_view", "strong"),
                  ("data.cutmix_prob", 0.5), ("train.teacher", "ema"), ("train.ema_decay", 0.99),
                  ("train.conf_thresh", 0.9), ("train.loss_u_ignore_padding", True)]


@pytest.mark.parametrize("method,key,value", [
    *[("supervised", k, v) for k, v in UNLABELED_ONLY + ALLSPARK_ONLY],
    *[("semi", k, v) for k, v in ALLSPARK_ONLY],
    *[("unimatch_v2", k, v) for k, v in ALLSPARK_ONLY]])
def test_keys_the_method_does_not_read_must_keep_their_defaults(method, key, value):
    assert set(method_lib.unread_keys(method)) == {k for k, _ in (
        ALLSPARK_ONLY + (UNLABELED_ONLY if method == "supervised" else []))}
    config = make_config()
    config.method = method
    *parents, leaf = key.split(".")
    config[parents[0]][leaf] = value
    default = config_lib.default_config()[parents[0]][leaf]
    with pytest.raises((errors.ConfigError, DataError),
                       match=rf"^config\.{key}={value!r}: expected {default!r} \(its "
                             rf"configs/default.py value\) with method '{method}': ") as e:
        config_lib.validate(config)
    assert "\n" not in str(e.value)
    assert isinstance(e.value, DataError) == key.startswith("data.")
    # a method that reads the key takes the value
    config.method = "allspark"
    config_lib.validate(config)


# A key that another key's value leaves unread: (key, changed value, the setting that reads it).
UNREAD_BY_SETTING = [
    ("train.ohem_thresh", 0.5, ("train.loss_x", "ohem")),
    ("train.ohem_min_kept", 1000, ("train.loss_x", "ohem")),
    ("profile_first_step", 3, ("profile", True)),
    ("profile_num_steps", 2, ("profile", True)),
    ("data.tfds_data_dir", "/tfds", ("data.source", "tfds")),
]


@pytest.mark.parametrize("key,value,reader", UNREAD_BY_SETTING)
def test_keys_another_setting_leaves_unread_must_keep_their_defaults(key, value, reader):
    config = config_lib.load_config(os.path.join(CONFIGS, "pascal.py"))
    *parents, leaf = key.split(".")
    _node(config, parents)[leaf] = value
    default = _node(config_lib.default_config(), parents)[leaf]
    with pytest.raises((errors.ConfigError, DataError),
                       match=rf"^config\.{key}={value!r}: expected {default!r} \(its "
                             rf"configs/default.py value\): only .* it \("):
        config_lib.validate(config)
    # with the setting that reads it, the value is taken
    *parents, leaf = reader[0].split(".")
    _node(config, parents)[leaf] = reader[1]
    config_lib.validate(config)


def _node(config, parents):
    for part in parents:
        config = config[part]
    return config


def test_with_method_puts_back_what_the_method_does_not_read():
    config = config_lib.load_config(os.path.join(CONFIGS, "learning.py"))
    assert (config.train.warmup_epoch, config.train.ema_decay) == (2, 0.99)
    semi = config_lib.with_method(config, "semi")
    assert (semi.method, semi.train.warmup_epoch, semi.train.ema_decay) == ("semi", 5, 0.99)
    sup = config_lib.with_method(config, "supervised")
    assert (sup.train.warmup_epoch, sup.train.ema_decay) == (5, 0.999)
    assert sup.optim.lr == config.optim.lr and config.method == "allspark"  # the rest kept, a copy
    for c in (semi, sup):
        config_lib.validate(c)
    # keys in `keep` (set on the command line) stay, and validation names them
    kept = config_lib.with_method(config, "semi", keep=("train.warmup_epoch",))
    assert kept.train.warmup_epoch == 2
    with pytest.raises(errors.ConfigError, match=r"config.train.warmup_epoch=2: expected 5"):
        config_lib.validate(kept)


@pytest.mark.parametrize("spec", ["demo.py:semi", "demo.py:supervised", "cityscapes.py:1_16,semi",
                                  "coco.py:1_32,semi", "learning.py"])
def test_config_arguments_set_allspark_keys_for_allspark_only(spec):
    config_lib.validate(config_lib.load_config(os.path.join(CONFIGS, spec)))


def test_switching_a_config_to_a_method_that_ignores_its_keys_is_named():
    config = config_lib.load_config(os.path.join(CONFIGS, "cityscapes.py:1_16"))
    config.method = "supervised"
    with pytest.raises(errors.ConfigError, match=r"config.train.warmup_epoch=15: expected 5"):
        config_lib.validate(config)


@pytest.mark.parametrize("key,value,message", [
    ("learning.pretrain_steps", -1, r"learning.pretrain_steps=-1: expected an integer >= 0"),
    ("learning.pretrain_num_classes", 1, r"pretrain_num_classes=1: expected an integer >= 2"),
    ("learning.pretrain_seed", 0, r"learning.pretrain_seed=0: expected a seed other than "
                                  r"data.synthetic.seed \(0\)"),
    ("model.pretrained", "mit_b0.pth", r"model.pretrained='mit_b0.pth': expected None with "
                                       r"learning.pretrain_steps > 0"),
    ("data.name", "pascal", r"learning.pretrain_steps=640: expected 0 with data.name='pascal'"),
])
def test_learning_pretraining_keys(key, value, message):
    """The learning experiment validates its own keys (learning.*); the general validation does
    not read them."""
    config = config_lib.load_config(os.path.join(CONFIGS, "learning.py"))
    config_lib.validate(config)
    learning.validate_learning(config)
    *parents, leaf = key.split(".")
    config[parents[0]][leaf] = value
    if key == "data.name":
        config.data.root = "/data/voc"
        config.data.split = "1_16"
        config.data.num_classes = 21
    if key.startswith("learning."):
        config_lib.validate(config)
    with pytest.raises((errors.ConfigError, DataError), match=message):
        learning.validate_learning(config)


@pytest.mark.parametrize("env, message", [
    ({"ALLSPARK_NUM_PROCESSES": "two", "ALLSPARK_PROCESS_ID": "0"},
     "ALLSPARK_NUM_PROCESSES='two': expected an integer >= 1"),
    ({"ALLSPARK_NUM_PROCESSES": "2", "ALLSPARK_PROCESS_ID": "2"},
     "process_id=2 must be below num_processes=2"),
    ({"ALLSPARK_NUM_PROCESSES": "2"}, "needs num_processes and process_id"),
])
def test_bad_distributed_settings_are_config_errors(monkeypatch, env, message):
    monkeypatch.setenv("ALLSPARK_COORDINATOR", "127.0.0.1:1")
    for key in ("ALLSPARK_NUM_PROCESSES", "ALLSPARK_PROCESS_ID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(errors.ConfigError, match=message):
        runtime.initialize_distributed(make_config())


def test_a_batch_not_divisible_by_the_devices_is_a_config_error():
    mesh = types.SimpleNamespace(shape={sharding.DATA_AXIS: 4})  # all the check reads of a mesh
    sharding.check_batch_divisible(12, mesh)
    with pytest.raises(errors.ConfigError, match=r"config.data.batch_size=10 \(global\) must "
                       "be divisible by the 4 devices"):
        sharding.check_batch_divisible(10, mesh)
