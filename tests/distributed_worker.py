"""Runs a few AllSpark train steps on a given device/process layout and saves the final state.

    python tests/distributed_worker.py OUT.npz --devices 8 [--processes 2 --process_id 0 --port P]
        [--shard_params] [--teacher ema] [--method unimatch_v2_allspark]

The global batch (8 labeled + 8 unlabeled, 65x65, CutMix boxes on half of the unlabeled images,
whose partners lie on other devices) and the weights (the reference's tiny model) are the same for
every layout, so every layout must end in the same state. `--method unimatch_v2_allspark`: UniMatch
V2's iteration with the AllSpark module instead (two strong views with their own boxes, the
CutMix partners mirrored within each of 2 loss groups of 4 images, across devices).
"""
import argparse
import os

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--devices", type=int, default=1, help="CPU devices per process")
parser.add_argument("--processes", type=int, default=1)
parser.add_argument("--process_id", type=int, default=0)
parser.add_argument("--port", type=int, default=0)
parser.add_argument("--shard_params", action="store_true")
parser.add_argument("--teacher", default="online")
parser.add_argument("--method", default="allspark")
args = parser.parse_args()
import run_config  # noqa: E402  (the session's XLA flags, in the inherited environment, stay)

os.environ["XLA_FLAGS"] = run_config.xla_flags(
    f"--xla_force_host_platform_device_count={args.devices}")

import jax  # noqa: E402

if args.processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{args.port}", num_processes=args.processes,
                               process_id=args.process_id)

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from allspark_jax import method as method_lib  # noqa: E402
from allspark_jax import optimizer, sharding, state as state_lib, train_step  # noqa: E402
from allspark_jax.weights import release  # noqa: E402
from allspark_jax.configs import default  # noqa: E402
from reference_model import reference  # noqa: E402

GLOBAL_BATCH, STEPS = 8, 3


def global_batches(size: int, steps: int):
    rng = np.random.default_rng(0)
    for _ in range(steps):
        mask = rng.integers(0, 5, (GLOBAL_BATCH, size, size)).astype(np.int32)
        mask[:, :4] = 255
        x_u = rng.normal(size=(GLOBAL_BATCH, size, size, 3)).astype(np.float32)
        box = np.zeros((GLOBAL_BATCH, size, size), bool)
        box[::2, 10:40, 5:50] = True
        batch = {"image_l": rng.normal(size=(GLOBAL_BATCH, size, size, 3)).astype(np.float32),
                 "mask_l": mask, "image_u_w": x_u, "image_u_s": x_u,
                 "pad_u": np.zeros((GLOBAL_BATCH, size, size), bool), "cutmix_u": box}
        if args.method == "unimatch_v2_allspark":
            batch["pad_u"][:, :, -8:] = True
            batch["image_u_s1"] = batch.pop("image_u_s")
            batch["image_u_s2"] = rng.normal(size=x_u.shape).astype(np.float32)
            batch["cutmix_u1"] = batch.pop("cutmix_u")
            batch["cutmix_u2"] = np.roll(box, 1, axis=0)
        yield batch


def main():
    ref = reference()
    assert jax.device_count() == args.devices * args.processes
    optim = ml_collections.ConfigDict(dict(name="sgd", lr=0.01, lr_multi=10.0, momentum=0.9,
                                           weight_decay=1e-4, poly_power=0.9))
    tcfg = default.get_config().train
    tcfg.update(loss_x="ce", loss_groups=1, ema_decay=0.9, conf_thresh=0.0,
                loss_u_ignore_padding=False, key_group_size=None)
    # the batch carries CutMix boxes: the step mixes whenever they are there
    method = method_lib.resolve("allspark", teacher=args.teacher, student_view="weak",
                                cutmix_prob=0.5)
    if args.method == "unimatch_v2_allspark":
        # SGD, not its AdamW: Adam's first steps divide each gradient entry by its own size, so
        # entries near zero (~ its eps) turn float32 summation-order noise, which differs between
        # layouts as between PyTorch DDP's GPU counts, into update differences far above float32
        # round-off; what is checked here (partners, views, memory across devices) is the step's.
        tcfg.update(loss_groups=2, ema_decay=0.996, conf_thresh=0.0, loss_u_ignore_padding=True,
                    key_group_size=2)
        method = method_lib.resolve(args.method, teacher="ema", student_view="strong",
                                    cutmix_prob=0.5)
    tx, _ = optimizer.create_optimizer(optim, 10)
    state = state_lib.create_train_state(ref.model, tx, jax.random.key(0), 65,
                                     ema=method.ema, variables=ref.variables)
    mesh = sharding.create_mesh()
    state_sh = state_lib.state_sharding(state, mesh, args.shard_params)
    batch_sh = sharding.batch_sharding(mesh)
    state = sharding.put_global(sharding.to_host(state), state_sh)
    steps = {m: train_step.make_train_step(ref.model, tx, tcfg, use_memory=m, state_sharding=state_sh,
                                      batch_sharding=batch_sh, method=method)
             for m in (False, True)}
    local = GLOBAL_BATCH // args.processes
    losses = []
    for t, batch in enumerate(global_batches(65, STEPS)):
        rows = slice(args.process_id * local, (args.process_id + 1) * local)
        batch = {k: jax.make_array_from_process_local_data(batch_sh, v[rows])
                 for k, v in batch.items()}
        state, metrics = steps[t > 0](state, batch)  # memory read from step 1 on
        losses.append(float(metrics["loss"]))
    host = sharding.to_host(state)
    out = release.to_state_dict(host.variables())
    if host.ema_params is not None:
        out.update({f"ema/{k}": v for k, v in release.to_state_dict({"params": host.ema_params}).items()})
    if args.process_id == 0:
        np.savez(args.out, losses=np.array(losses), **out)
    print("done", losses)


main()
