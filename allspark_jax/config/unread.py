"""Keys a run does not read, and why: they must keep their configs/default.py values.

A key that the run's method does not read (`method.unread_keys`: AllSpark's own under 'semi' /
'supervised', the unlabeled-data keys under 'supervised'), or that another key's value leaves
unread (`unread_by_setting`), would be accepted and ignored if it were changed; `check` refuses it,
naming the key, its default and the reason. `with_method` switches a config's method and puts such
keys back at their defaults.
"""
from __future__ import annotations

import copy

import ml_collections

from allspark_jax import method as method_lib
from allspark_jax.config.checks import error, get, set_value
from allspark_jax.configs import default


def defaults() -> ml_collections.ConfigDict:
    """configs/default.py's config."""
    return default.get_config()


def unread_by_setting(config) -> dict[str, str]:
    """The keys that another key's value leaves unread -> why (whatever the method).

    Not here, because a dataset config's own value would then refuse a plain override of the other
    key: eval.crop_size (the demo's) under eval.mode 'original', data.synthetic.* (the demo's) for
    another dataset, train.ema_decay (configs/learning.py's) under the online teacher.
    """
    out = {}
    if config.train.loss_x != "ohem":
        out.update(dict.fromkeys(("train.ohem_thresh", "train.ohem_min_kept"),
                                 f"only train.loss_x 'ohem' reads it (train.loss_x="
                                 f"{config.train.loss_x!r})"))
    if not config.profile:
        out.update(dict.fromkeys(("profile_first_step", "profile_num_steps"),
                                 "only profile=True reads it (profile=False)"))
    if config.optim.name != "sgd":
        out["optim.momentum"] = f"only optim.name 'sgd' reads it (optim.name={config.optim.name!r})"
    if config.optim.name != "adamw":
        out["optim.betas"] = f"only optim.name 'adamw' reads it (optim.name={config.optim.name!r})"
    encoder = config.model.encoder
    if encoder == "mit":
        out.update(dict.fromkeys(("model.dpt.features", "model.dpt.out_channels",
                                  "model.dpt.layers"),
                                 "only model.encoder 'dinov2' reads it (model.encoder='mit')"))
    else:
        out.update(dict.fromkeys(("model.decoder_dim", "model.head_dropout",
                                  "model.drop_path_rate", "model.remat"),
                                 f"only model.encoder 'mit' reads it (model.encoder={encoder!r})"))
    if config.data.source != "tfds":
        out["data.tfds_data_dir"] = (f"only data.source 'tfds' reads it (data.source="
                                     f"{config.data.source!r})")
    return out


def check(config) -> None:
    """Raises ConfigError / DataError for the first key that the method or another key's value
    leaves unread and whose value differs from configs/default.py's."""
    method = config.method
    unread = {key: f" with method {method!r}: {why}"
              for key, why in method_lib.unread_keys(method).items()}
    for key, why in unread_by_setting(config).items():
        unread.setdefault(key, f": {why}")
    base = defaults()
    for key, why in unread.items():
        value, default = get(config, key), get(base, key)
        if value != default:
            raise error(key, value, f"{default!r} (its configs/default.py value){why}")


def with_method(config, method: str, keep=()) -> ml_collections.ConfigDict:
    """A copy of `config` that runs `method`, the keys it does not read back at their defaults,
    except the dotted keys in `keep` (which `check` then refuses when changed).

    For a method switched after the config file set its keys (`--config.method=...`: `keep` holds
    the keys the command line set) and for callers that derive one run per method from one config
    (the learning benchmark).
    """
    out = copy.deepcopy(config)
    out.method = method
    base = defaults()
    for key in method_lib.unread_keys(method):
        if key not in keep:
            set_value(out, key, get(base, key))
    return out
