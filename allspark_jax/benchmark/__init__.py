"""Speed, memory and scaling of the AllSpark train step and of inference, on whatever JAX finds.

    python -m allspark_jax.benchmark --config configs/pascal.py --config.model.backbone=b0 \
        --per_device_batch 1 --what matmul,train,infer,profile,pipeline,scaling --json out.json

The model, crop, precision (`model.dtype`), rematerialisation (`model.remat`) and the train step's
settings come from the config, as in training; the flags below only say what to measure. Every
measurement prints as a table and all of them go to `--json`.

What is measured (times are medians over `--steps` calls after `--warmup` calls, each call waited for
with `block_until_ready`; compile time excludes tracing, which is reported apart as `lower_s`):
  * matmul   FLOP/s of an (N, N) @ (N, N) product in the model's dtype on one device: the peak that
             utilisation is measured against (on CPU, the whole host: its threads serve every
             simulated device).
  * train    the full step as training runs it (`train.make_train_step`, memory read, state donated):
             teacher pass + student forward/backward + the optimiser (+ EMA) on B labeled + B
             unlabeled images (UniMatch V2's recipe: two strong views of each unlabeled one).
             images/s counts 2B (as the run loop logs); FLOPs from XLA's cost analysis; memory from
             XLA's buffer assignment (arguments + outputs + temporaries - aliased) and, where the
             backend reports it, the device's peak bytes in use.
  * infer    the "eval"-mode forward of B images at the crop (every image attends only to itself).
  * profile  where the step's time goes: a profiler trace of a few steps, each XLA op's time summed
             and attributed to its phase (teacher / forward / backward / update) and module (encoder
             stage and sub-layer, AllSpark, head) through the op metadata of the compiled program.
  * pipeline the training input pipeline of the config's method (synthetic Pascal-sized JPEGs at
             the crop) alone, in examples/s, against the examples/s the step consumes; and the
             step fed by it.
  * compile  the train step compiled, not run: compile time, FLOPs and XLA's memory estimate, for
             configurations that do not fit the host.
  * eval     cold-start evaluation of a set of images in many sizes (`--eval_images`,
             `--eval_sizes`, `--eval_sides`), compilation included: per-size programs (the
             release's one image at a time) against size buckets (`config.eval.buckets`).
  * predict  the same for `--mode predict` on a folder of JPEGs.
  * scaling  the train step in subprocesses with 1..N devices (`--devices`) at a fixed per-device
             batch; on CPU the devices are simulated (`jax_num_cpu_devices`) and share the host.

`python -m allspark_jax.benchmark.versus_release` times the authors' PyTorch release and this
command alternately, case by case, and prints the ratio table (`versus_release`).
"""
