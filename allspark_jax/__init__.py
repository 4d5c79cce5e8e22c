"""allspark-jax: AllSpark semi-supervised semantic segmentation in JAX/Flax.

Layers, bottom to top. A module imports from its own layer or the layers below, never from above,
and no modules import each other in a circle (tests/test_layers.py reads every import, lazy ones
too, against this table):

  1. errors                       every error type the package raises
  2. method, configs              the method of a run; the shipped config files
  3. data, models                 datasets and input pipelines; the networks and their layers
  4. losses, optimizer, sharding, state, train_step, nonfinite, evaluation, workdir
                                  the train step and its parts; evaluation programs; run folders
  5. weights                      weight files: the release's, Hugging Face's, DINOv2's
  6. checkpoints                  orbax checkpoints; a checkpoint spec -> variables
  7. config                       loading, validation, the resolved data options
  8. runtime                      process start-up
  9. train, inspection, notebook  the run loop; inspecting a model; notebook helpers
 10. commands, benchmark, experiments, tools, __main__
                                  the command lines
"""
