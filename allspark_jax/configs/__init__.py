"""The shipped configs: `default` (every key, its default and meaning) and the configs built on it,
`pascal`, `cityscapes`, `coco` (argument `SPLIT[,METHOD]`), `custom`, `demo` (argument `METHOD`) and
`learning`. Commands name them `configs/NAME.py[:ARG]` or `NAME[:ARG]`
(`allspark_jax.config.load_config`); a config file of one's own starts from them with
`from allspark_jax.configs import default`.
"""
