"""Read and write PyTorch ``.pth`` files without importing torch.

Since torch 1.6, ``torch.save`` writes a zip archive::

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

``load_pth`` unpickles ``data.pkl`` with an allow-list unpickler: the only globals
it resolves are the handful torch itself uses for tensors and containers, each
mapped to a local, side-effect free function, so a malicious file cannot run code.
``save_pth`` emits that pickle by hand (the ``torch`` globals cannot be pickled by
reference without torch installed) and writes the zip the way torch's miniz writer
does, so ``torch.load`` - including ``weights_only=True`` and ``mmap=True`` - reads it.
"""

from __future__ import annotations

import io
import os
import pickle
import secrets
import struct
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

__all__ = ["PthFormatError", "load_pth", "save_pth"]

# Legacy typed-storage class names (what torch.save puts in persistent ids) and
# the element type of their bytes.  torch.UntypedStorage holds plain bytes.
_STORAGE_DTYPES = {
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
_STORAGE_NAMES = {dtype: name for name, dtype in _STORAGE_DTYPES.items()}

_ALIGNMENT = 64  # torch's default `.storage_alignment`; data offsets are multiples
_LEGACY_MAGIC = bytes.fromhex("80028a0a6cfc9c46f9206aa85019")  # pickled pre-1.6 magic


class PthFormatError(ValueError):
    """The file is not a PyTorch zip checkpoint this module can (safely) read."""


# --------------------------------------------------------------------------- load


class _StorageType:
    """Stand-in for a ``torch.*Storage`` class: only carries the element dtype."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: np.dtype):
        self.dtype = dtype


class _Tensor:
    """A rebuilt tensor, unwrapped to an ndarray after unpickling.

    Returning a slot-only wrapper (not the ndarray) from the rebuild functions
    keeps pickle's BUILD opcode from reaching ``ndarray.__setstate__``.
    """

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array


class _StateDict(dict):
    """``collections.OrderedDict`` stand-in.

    ``Module.state_dict()`` pickles an attribute ``_metadata`` (module versions)
    through BUILD; it is irrelevant to numpy users, so ``__setstate__`` drops it.
    """

    def __setstate__(self, state: Any) -> None:
        pass


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None) -> _Tensor:
    if not isinstance(storage, np.ndarray):
        raise PthFormatError(f"tensor storage is {type(storage).__name__}, not a storage")
    size, stride = tuple(size), tuple(stride)
    if not all(isinstance(v, int) for v in (storage_offset, *size, *stride)) or \
            len(size) != len(stride) or storage_offset < 0 or min(size + stride, default=0) < 0:
        raise PthFormatError(f"bad tensor geometry: offset={storage_offset!r} "
                             f"size={size!r} stride={stride!r}")
    if 0 in size:
        return _Tensor(np.zeros(size, storage.dtype))
    # as_strided does no bounds checking: verify the last element is in the storage.
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise PthFormatError(f"tensor (offset={storage_offset}, size={size}, stride={stride}) "
                             f"reads past its storage of {storage.size} elements")
    view = np.lib.stride_tricks.as_strided(
        storage[storage_offset:], shape=size,
        strides=[s * storage.itemsize for s in stride], writeable=False)
    return _Tensor(np.array(view, order="C"))  # copy: own, contiguous memory


def _rebuild_parameter(data, requires_grad, backward_hooks) -> _Tensor:
    return data  # an nn.Parameter is its data as far as numpy is concerned


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state) -> _Tensor:
    if state:
        raise PthFormatError("nn.Parameter carries extra Python state; not supported")
    return data


def _device(kind, index=None) -> str:
    return kind if index is None else f"{kind}:{index}"


# The complete allow-list: (module, name) -> harmless local replacement.
_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("collections", "OrderedDict"): _StateDict,
    ("torch", "Size"): tuple,
    ("torch", "device"): _device,
    ("torch", "UntypedStorage"): _StorageType(np.dtype(np.uint8)),
    ("torch.storage", "UntypedStorage"): _StorageType(np.dtype(np.uint8)),
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _Unpickler(pickle.Unpickler):
    """Allow-list unpickler reading storages from the open zip archive."""

    def __init__(self, data: bytes, zf: zipfile.ZipFile, prefix: str,
                 little_endian: bool, path: str):
        super().__init__(io.BytesIO(data))
        self._zf, self._prefix, self._path = zf, prefix, path
        self._little = little_endian
        self._storages: dict[tuple[str, np.dtype], np.ndarray] = {}  # shared storages

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _GLOBALS[(module, name)]
        except KeyError:
            raise PthFormatError(
                f"{self._path}: refusing to load global '{module}.{name}': only "
                "tensors and plain containers are allowed") from None

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
                and isinstance(pid[4], int)):
            raise PthFormatError(f"{self._path}: unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid  # location ignored: all -> CPU
        dtype = storage_type.dtype
        if (key, dtype) not in self._storages:
            try:
                raw = self._zf.read(f"{self._prefix}data/{key}")
            except KeyError:
                raise PthFormatError(f"{self._path}: missing storage record data/{key}") from None
            if len(raw) != numel * dtype.itemsize:
                raise PthFormatError(f"{self._path}: storage data/{key} has {len(raw)} bytes, "
                                     f"expected {numel} x {dtype.itemsize}")
            array = np.frombuffer(raw, dtype)
            if dtype.itemsize > 1 and self._little != (sys.byteorder == "little"):
                array = array.byteswap()
            self._storages[(key, dtype)] = array
        return self._storages[(key, dtype)]


def _unwrap(obj: Any) -> Any:
    """Replace tensor wrappers by arrays and dict subclasses by plain dicts."""
    if isinstance(obj, _Tensor):
        return obj.array
    if isinstance(obj, dict):
        return {k: _unwrap(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unwrap(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_unwrap(v) for v in obj)
    return obj


def load_pth(path: str | os.PathLike) -> Any:
    """Load a torch>=1.6 ``.pth`` file; tensors become C-contiguous numpy arrays.

    ``OrderedDict`` (e.g. ``state_dict()``) comes back as a plain ``dict`` in the
    same order.  Raises ``FileNotFoundError`` if ``path`` does not exist and
    ``PthFormatError`` if it is not a zip checkpoint or references anything
    beyond tensors and containers.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(2, "No such .pth file", path)
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            legacy = f.read(len(_LEGACY_MAGIC)) == _LEGACY_MAGIC
        raise PthFormatError(
            f"{path}: not a zip archive"
            + (" (it is the legacy pre-1.6 torch.save format)" if legacy else "")
            + "; expected a PyTorch zip checkpoint - re-save it with torch>=1.6 "
            "via `torch.save(obj, f)`")
    with zipfile.ZipFile(path) as zf:
        pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise PthFormatError(f"{path}: expected exactly one '<name>/data.pkl' in the zip, "
                                 f"found {len(pickles)}; is this a torch.save checkpoint?")
        prefix = pickles[0][: -len("data.pkl")]
        try:
            byteorder = zf.read(prefix + "byteorder")
        except KeyError:
            byteorder = b"little"  # torch's default for files without the record
        if byteorder not in (b"little", b"big"):
            raise PthFormatError(f"{path}: unknown byteorder record {byteorder!r}")
        unpickler = _Unpickler(zf.read(pickles[0]), zf, prefix, byteorder == b"little", path)
        try:
            obj = unpickler.load()
        except PthFormatError as e:
            if str(e).startswith(path):
                raise
            raise PthFormatError(f"{path}: {e}") from None
        except Exception as e:  # malformed pickle: report it as a format problem
            raise PthFormatError(f"{path}: corrupt data.pkl ({type(e).__name__}: {e})") from e
    return _unwrap(obj)


# --------------------------------------------------------------------------- save


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
        name = _STORAGE_NAMES.get(dtype)
        if name is None:
            raise TypeError(f"save_pth: dtype {array.dtype} at {where} has no torch storage type")
        if id(array) not in self._keys:
            data = np.asarray(array, dtype=_STORAGE_DTYPES[name])  # native byte order
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
        pad = -(offset + 30 + len(fname) + 4) % _ALIGNMENT
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
               (".storage_alignment", str(_ALIGNMENT).encode()), ("byteorder", b"little")]
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
