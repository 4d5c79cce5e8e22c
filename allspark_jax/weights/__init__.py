"""Weights from outside the training loop: the release's `.pth` / `.npz` files, Hugging Face
SegFormer and Dinov2Model checkpoints, facebookresearch's DINOv2 encoders and UniMatch V2's DPT
checkpoints, read and written without torch; `loader` decides which a weight spec is.

Modules, each importing only those listed before it (and `allspark_jax.errors`,
`allspark_jax.models`):

  pth_format          the zip container torch.save writes, and its storage types
  pth_reader          a safe, torch-free reader of it (`load_pth`)
  pth_writer          its writer (`save_pth`), which torch.load reads
  release             the release's state-dict names and array layouts <-> Flax variables
  dinov2              DINOv2 / UniMatch V2 DPT state-dict names (facebookresearch's,
                      transformers', UniMatch V2's) <-> Flax variables; what a state dict holds
  release_files       the `.npz` / `.pth` files: the release's state dicts, official
                      checkpoints, `mit_bX.pth` encoders; UniMatch V2's checkpoints and
                      `dinov2_vit*14_pretrain.pth` encoders
  huggingface_keys    transformers' SegFormer key names <-> the release's
  huggingface         transformers' checkpoints (SegFormer, Dinov2Model): config.json <-> the
                      model's configuration, files, hub downloads, import and export
  loader              the one place deciding a weight spec's source, and loading it

The package imports nothing of the run loop, the config, the checkpoints or the commands.
"""
