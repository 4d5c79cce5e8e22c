"""The container ``torch.save`` writes since torch 1.6 (a ``.pth`` / ``.pt`` file): its layout
and the storage types it names. `pth_reader` reads it, `pth_writer` writes it, without torch.

A zip archive, every record stored uncompressed::

    <name>/data.pkl            pickle (protocol 2) of the object; each tensor is
                               ``torch._utils._rebuild_tensor_v2(storage, offset,
                               size, stride, requires_grad, hooks)`` and each
                               storage a persistent id ``('storage', torch.FloatStorage,
                               '<key>', '<location>', numel)``
    <name>/.format_version     b'1'
    <name>/.storage_alignment  b'64'
    <name>/byteorder           b'little' (absent in old files: means little)
    <name>/data/<key>          raw storage bytes, stored uncompressed
    <name>/version             b'3\\n'
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

# Legacy typed-storage class names (what torch.save puts in persistent ids) and
# the element type of their bytes.  torch.UntypedStorage holds plain bytes.
STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
STORAGE_NAMES = {dtype: name for name, dtype in STORAGE_DTYPES.items()}

ALIGNMENT = 64  # torch's default `.storage_alignment`; data offsets are multiples
LEGACY_MAGIC = bytes.fromhex("80028a0a6cfc9c46f9206aa85019")  # pickled pre-1.6 magic
