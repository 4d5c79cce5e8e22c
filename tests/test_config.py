"""The config: files load by path, every shipped config validates, each bad value is named once."""
import os

import pytest

from allspark_jax import config as config_lib
from allspark_jax.data.datasets import DataError
from conftest import ROOT, make_config

CONFIGS = os.path.join(ROOT, "configs")


@pytest.mark.parametrize("spec", ["default.py", "demo.py", "pascal.py:92", "pascal.py:u2pl_1_8",
                                  "cityscapes.py:1_30", "coco.py:1_512"])
def test_shipped_configs_load_by_path_and_validate(spec):
    config = config_lib.load_config(os.path.join(CONFIGS, spec))
    config_lib.validate(config)


@pytest.mark.parametrize("key,value,message", [
    ("data.name", "imagenet", r"data.name='imagenet' is not a known dataset"),
    ("data.source", "lmdb", r"config.data.source='lmdb': expected one of 'files', 'tfds'"),
    ("data.cutmix_prob", 1.5, r"config.data.cutmix_prob=1.5: expected a number >= 0.0 and <= 1.0"),
    ("data.scale_range", (2.0, 0.5), r"config.data.scale_range"),
    ("model.dtype", "float8", r"config.model.dtype='float8': expected one of"),
    ("model.backbone", "b9", r"config.model.backbone: unknown MiT variant 'b9'"),
    ("optim.lr", 0.0, r"config.optim.lr=0.0: expected a number > 0.0"),
    ("train.loss_x", "dice", r"config.train.loss_x='dice': expected one of 'ce', 'ohem'"),
    ("train.teacher", "mean", r"config.train.teacher='mean': expected one of 'online', 'ema'"),
    ("train.loss_groups", 3, r"config.train.loss_groups=3: expected a divisor of data.batch_size"),
    ("train.key_group_size", 5, r"config.train.key_group_size=5: expected None or a divisor"),
    ("eval.mode", "tiled", r"config.eval.mode='tiled': expected one of 'original'"),
    ("eval.best_of", "ema", r"config.eval.best_of='ema': expected 'student' unless"),
    ("keep_checkpoints", 0, r"config.keep_checkpoints=0: expected an integer >= 1"),
    ("train.stop_on_nan", None, r"config.train.stop_on_nan=None: expected True or False"),
])
def test_bad_values_name_the_key_and_what_is_allowed(key, value, message):
    config = make_config()
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises((config_lib.ConfigError, DataError), match=message) as e:
        config_lib.validate(config)
    assert "\n" not in str(e.value)  # one line
    assert isinstance(e.value, DataError) == key.startswith("data.")


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="does not exist"):
        config_lib.load_config(str(tmp_path / "nope.py"))
