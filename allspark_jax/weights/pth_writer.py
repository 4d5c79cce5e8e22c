"""Writes PyTorch ``.pth`` files (`pth_format`) without importing torch.

``save_pth`` emits the pickle by hand (the ``torch`` globals cannot be pickled by
reference without torch installed) and writes the zip the way torch's miniz writer
does, so ``torch.load`` - including ``weights_only=True`` and ``mmap=True`` - reads it.
"""

from __future__ import annotations

import io
import os
import secrets
import struct
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from allspark_jax.weights.pth_format import ALIGNMENT, STORAGE_DTYPES, STORAGE_NAMES

__all__ = ["save_pth"]


class _PickleWriter:
    """Emits protocol-2 pickle opcodes for plain data plus tensors, like torch.save.

    Tensors are pickled as ``_rebuild_tensor_v2`` calls whose storage is a
    persistent id; ``storages`` collects the bytes, keyed '0', '1', ... in
    first-use order (the order torch.save uses and torch.load's offset
    calculation relies on).
    """

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.storages: list[bytes] = []
        self._keys: dict[int, tuple[str, np.ndarray]] = {}  # id(array) -> key: shared arrays

    def dump(self, obj: Any) -> bytes:
        self.out.write(b"\x80\x02")  # PROTO 2
        self._save(obj, "obj")
        self.out.write(b".")  # STOP
        return self.out.getvalue()

    def _global(self, module: str, name: str) -> None:
        self.out.write(b"c" + f"{module}\n{name}\n".encode("ascii"))

    def _save(self, obj: Any, where: str) -> None:
        w = self.out.write
        if isinstance(obj, (np.ndarray, np.generic)):  # before float: np.float64 is a float
            self._tensor(np.asarray(obj), where)
        elif obj is None:
            w(b"N")
        elif isinstance(obj, bool):
            w(b"\x88" if obj else b"\x89")  # NEWTRUE / NEWFALSE
        elif isinstance(obj, int):
            self._int(int(obj))
        elif isinstance(obj, float):
            w(b"G" + struct.pack(">d", obj))  # BINFLOAT
        elif isinstance(obj, str):
            data = obj.encode("utf-8", "surrogatepass")
            w(b"X" + struct.pack("<I", len(data)) + data)  # BINUNICODE
        elif isinstance(obj, tuple):
            if not obj:
                w(b")")  # EMPTY_TUPLE
                return
            if len(obj) > 3:
                w(b"(")  # MARK
            for i, item in enumerate(obj):
                self._save(item, f"{where}[{i}]")
            w({1: b"\x85", 2: b"\x86", 3: b"\x87"}.get(len(obj), b"t"))  # TUPLE1/2/3; TUPLE
        elif isinstance(obj, list):
            w(b"]")  # EMPTY_LIST
            if obj:
                w(b"(")
                for i, item in enumerate(obj):
                    self._save(item, f"{where}[{i}]")
                w(b"e")  # APPENDS
        elif isinstance(obj, dict):
            w(b"}")  # EMPTY_DICT
            if obj:
                w(b"(")
                for key, value in obj.items():
                    self._save(key, f"{where} key {key!r}")
                    self._save(value, f"{where}[{key!r}]")
                w(b"u")  # SETITEMS
        else:
            raise TypeError(f"save_pth: cannot store {type(obj).__name__} at {where}")

    def _int(self, v: int) -> None:
        if 0 <= v < 0x100:
            self.out.write(b"K" + bytes([v]))  # BININT1
        elif 0 <= v < 0x10000:
            self.out.write(b"M" + struct.pack("<H", v))  # BININT2
        elif -0x80000000 <= v < 0x80000000:
            self.out.write(b"J" + struct.pack("<i", v))  # BININT
        else:
            data = v.to_bytes(v.bit_length() // 8 + 1, "little", signed=True)
            self.out.write(b"\x8a" + bytes([len(data)]) + data)  # LONG1 (< 256 bytes)

    def _tensor(self, array: np.ndarray, where: str) -> None:
        dtype = array.dtype if array.dtype.isnative else array.dtype.newbyteorder("=")
        name = STORAGE_NAMES.get(dtype)
        if name is None:
            raise TypeError(f"save_pth: dtype {array.dtype} at {where} has no torch storage type")
        if id(array) not in self._keys:
            data = np.asarray(array, dtype=STORAGE_DTYPES[name])  # native byte order
            if data.itemsize > 1 and sys.byteorder != "little":
                data = data.byteswap()  # the byteorder record says little
            self._keys[id(array)] = (str(len(self.storages)), array)  # keep array: id stays unique
            self.storages.append(data.tobytes(order="C"))
        key = self._keys[id(array)][0]
        # contiguous element strides; torch counts zero-length dims as 1
        strides, step = [], 1
        for n in reversed(array.shape):
            strides.insert(0, step)
            step *= max(n, 1)
        self._global("torch._utils", "_rebuild_tensor_v2")
        self.out.write(b"((")  # MARK args, MARK persistent id
        self._save("storage", where)
        self._global("torch", name)
        self._save(key, where)
        self._save("cpu", where)
        self._int(array.size)
        self.out.write(b"tQ")  # TUPLE, BINPERSID
        self._int(0)  # storage offset
        self._save(tuple(array.shape), where)
        self._save(tuple(strides), where)
        self.out.write(b"\x89")  # requires_grad=False
        self._global("collections", "OrderedDict")  # backward hooks: OrderedDict()
        self.out.write(b")RtR")  # EMPTY_TUPLE REDUCE, TUPLE, REDUCE


def _write_zip(f, prefix: str, records: list[tuple[str, bytes]]) -> None:
    """Write an uncompressed zip laid out exactly like torch's miniz writer.

    Every local header carries an extra field ``'FB' <len> 'Z'*pad`` so the
    data starts on a multiple of 64; non-empty records are followed by a
    data descriptor (flag bit 3).  torch.load(mmap=True) may compute storage
    offsets from this layout instead of reading the headers, so match it.
    """
    central = []
    for name, data in records:
        fname = f"{prefix}/{name}".encode("utf-8")
        offset = f.tell()
        pad = -(offset + 30 + len(fname) + 4) % ALIGNMENT
        extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
        crc, size = zlib.crc32(data), len(data)
        if offset + 30 + len(fname) + len(extra) + size + 16 >= 0xFFFFFFFF:
            raise ValueError("save_pth: checkpoints of 4 GiB or more (zip64) are not supported")
        flags = 0x0808 if size else 0x0800  # UTF-8 names (+ data descriptor)
        f.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 0, flags, 0, 0, 0, 0, 0, 0,
                            len(fname), len(extra)) + fname + extra + data)
        if size:
            f.write(struct.pack("<IIII", 0x08074B50, crc, size, size))
        central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 0, 0, flags, 0, 0, 0,
                                   crc, size, size, len(fname), 0, 0, 0, 0, 0, offset) + fname)
    cd_offset = f.tell()
    cd = b"".join(central)
    f.write(cd + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(central), len(central),
                             len(cd), cd_offset, 0))


def save_pth(obj: Any, path: str | os.PathLike) -> None:
    """Save ``obj`` so that ``torch.load(path, weights_only=True)`` reads it.

    ``obj`` may nest dict/list/tuple/str/int/float/bool/None; numpy arrays and
    numpy scalars become CPU tensors (float32/64/16, bfloat16, int64/32/16/8,
    uint8, bool).  The file is written to a temporary name and renamed into
    place, so a crash never leaves a truncated checkpoint behind.
    """
    path = Path(path)
    writer = _PickleWriter()
    records = [("data.pkl", writer.dump(obj)), (".format_version", b"1"),
               (".storage_alignment", str(ALIGNMENT).encode()), ("byteorder", b"little")]
    records += [(f"data/{key}", data) for key, data in enumerate(writer.storages)]
    records.append(("version", b"3\n"))
    # torch names the top folder after the file stem; any name loads.
    prefix = "".join(c if c.isalnum() or c in "_-." else "_" for c in path.stem) or "archive"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies
    try:
        with os.fdopen(fd, "wb") as f:
            _write_zip(f, prefix, records)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
