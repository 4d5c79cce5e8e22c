"""TensorFlow for the input pipelines, kept on the host: the modules that import TensorFlow for
tf.data or its image ops take it from here.

tf.data decodes and augments on the CPU and hands numpy arrays to JAX. A GPU or TPU build of
TensorFlow would otherwise initialise the accelerators at its first op and reserve their memory,
which JAX needs (JAX's own allocator already takes most of a GPU: README, "GPU memory").
"""
from __future__ import annotations

import tensorflow as tf

ACCELERATOR_KINDS = ("GPU", "TPU")


def keep_off_accelerators() -> None:
    """Makes TensorFlow see no GPU and no TPU (idempotent; a no-op on a CPU-only build).

    Must run before TensorFlow's first op, after which its visible devices are fixed.
    """
    for kind in ACCELERATOR_KINDS:
        try:
            tf.config.set_visible_devices([], kind)
        except RuntimeError as e:
            raise RuntimeError(
                f"TensorFlow initialised its devices before its {kind}s were hidden from it ({e}); "
                "import allspark_jax.data.host_tensorflow before any other use of TensorFlow"
            ) from None


keep_off_accelerators()
