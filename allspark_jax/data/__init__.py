"""Data: split lists, dataset layouts, TF augmentation, tf.data pipelines, TFDS builders.

Modules: `splits` (split names and list files), `datasets` (layouts, class names, file checks),
`augment` (the release's augmentation chain in TF ops), `input_pipeline` (training / validation
pipelines and device prefetch: the trainer's entry point), `tfds_builders` and `prepare` (TFDS
records), `synthetic` (a small learnable dataset in the Pascal layout), `benchmark`.
"""
