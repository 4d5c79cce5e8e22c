"""The shipped configs: `default` (every key, its default and meaning) and the configs built on it,
`pascal`, `cityscapes`, `coco` (argument `SPLIT[,METHOD][,ENCODER]`), `custom`, `demo` and `learning`
(argument `[METHOD][,ENCODER]`); METHOD is one of `allspark_jax.method.METHODS` (the release's
trainers and UniMatch V2's recipe). Commands name them `configs/NAME.py[:ARG]` or `NAME[:ARG]`
(`allspark_jax.config.load_config`); a config file of one's own starts from them with
`from allspark_jax.configs import default`.
"""
