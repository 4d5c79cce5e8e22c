"""allspark-jax: AllSpark semi-supervised semantic segmentation in JAX/Flax.

Layers, bottom to top; a module imports from its own layer or the layers below, never above:
  1. errors                    every error type the package raises
  2. method, configs           the method of a run; the shipped config files
  3. data, models              input pipelines and datasets; the network
  4. losses, optimizer, sharding, state, train_step, nonfinite, evaluation, workdir
  5. convert, pth, huggingface weight files of the release and of Hugging Face
  6. checkpoints               orbax checkpoints; a checkpoint spec -> variables
  7. config                    loading, validation, the resolved data options
  8. runtime                   process start-up
  9. train, inspection, notebook
 10. commands, benchmark, experiments, tools   the command lines
"""
