"""Resumes the topology run of test_topology.py on one process with N simulated CPU devices.

    python tests/topology_worker.py WORKDIR OUT.npz --devices 8 [--shard_params]

WORKDIR holds the checkpoint of step `run_config.TOPOLOGY_RESUME_STEP`, written by another topology.
The run resumes from it to the end (`train.train_and_evaluate`, checkpointing the last step), then
both checkpoints are restored replicated and split (`shard_params`) on this process's devices: every
array must land with the template's sharding and the same bits. OUT.npz gets the final state
(keys: tree paths).
"""
import argparse
import os

parser = argparse.ArgumentParser()
parser.add_argument("workdir")
parser.add_argument("out")
parser.add_argument("--devices", type=int, default=1, help="simulated CPU devices")
parser.add_argument("--shard_params", action="store_true")
args = parser.parse_args()
import run_config  # noqa: E402  (the session's XLA flags, in the inherited environment, stay)

os.environ["XLA_FLAGS"] = run_config.xla_flags(
    f"--xla_force_host_platform_device_count={args.devices}")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from allspark_jax import checkpoints, sharding, train  # noqa: E402


def flat_host(state) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_leaves_with_path(sharding.to_host(state))}


def check_restores(workdir: str, final: dict) -> None:
    """Each checkpoint restores replicated and split, placed as asked, with identical values."""
    ck = checkpoints.Checkpointer(workdir, read_only=True)
    for step in (run_config.TOPOLOGY_RESUME_STEP, run_config.TOPOLOGY_STEPS):
        values = []
        for shard in (False, True):
            template = checkpoints.restore_template(
                run_config.tiny_config(**run_config.TOPOLOGY, shard_params=shard))
            state, _, _ = ck.restore(step, template)
            placed = jax.tree.leaves(jax.tree.map(
                lambda x, t: x.sharding.is_equivalent_to(t.sharding, x.ndim), state, template))
            assert all(placed), (step, shard)
            split = [not x.sharding.is_fully_replicated for x in jax.tree.leaves(state)]
            assert any(split) == (shard and args.devices > 1), (step, shard)
            values.append(flat_host(state))
        for k in values[0]:
            np.testing.assert_array_equal(values[0][k], values[1][k], err_msg=f"{step} {k}")
        if step == run_config.TOPOLOGY_STEPS:
            for k in final:
                np.testing.assert_array_equal(values[0][k], final[k], err_msg=k)
    ck.close()


def main():
    assert jax.device_count() == args.devices
    config = run_config.tiny_config(**run_config.TOPOLOGY, shard_params=args.shard_params)
    # Only the steps after the checkpoint may run: ending at the last step proves the resume.
    out = train.train_and_evaluate(config, args.workdir, stop_after=(
        run_config.TOPOLOGY_STEPS - run_config.TOPOLOGY_RESUME_STEP))
    assert out["step"] == run_config.TOPOLOGY_STEPS, out["step"]
    final = flat_host(out["state"])
    check_restores(args.workdir, final)
    np.savez(args.out, **final)
    print("done")


main()
