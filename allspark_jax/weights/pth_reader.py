"""Reads PyTorch ``.pth`` files (`pth_format`) without importing torch, safely.

``load_pth`` reads ``data.pkl`` with a pickle interpreter of its own, not Python's
unpickler. It knows the protocol-2 opcodes torch.save emits (those torch's own
``weights_only`` unpickler accepts, less NEWOBJ and EMPTY_SET), resolves only the
globals torch uses for tensors and containers (to immutable markers: nothing in
one file can change how the next one loads), lets BUILD touch only an
``OrderedDict`` made by the same file, and builds only dicts, lists, tuples,
strings, numbers and arrays, so a malicious file cannot run code. Every way a
file can be malformed ends in ``PthFormatError`` naming the file and the record
(and, inside ``data.pkl``, the byte offset and opcode). Limits:

* records must be stored uncompressed, as torch.save writes them, so that no read
  allocates more than the file holds (a deflated record may expand ~1000x);
* containers nest at most ``MAX_NESTING`` levels and never contain themselves;
* a tensor's elements (offset + sum((size - 1) * stride)) lie inside its storage,
  with non-negative strides; zero-stride (expanded) and overlapping views are
  allowed, as torch writes them, but they come back as copies, so the tensors of
  one file may take at most ``MAX_EXPANSION`` times the bytes of the storages
  they view: a small file cannot make the reader allocate much more than its size.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import math
import os
import pickletools
import struct
import sys
import zipfile
from typing import Any, Callable

import numpy as np

from allspark_jax.errors import PthFormatError
from allspark_jax.weights.pth_format import LEGACY_MAGIC, STORAGE_DTYPES

__all__ = ["MAX_EXPANSION", "MAX_NESTING", "load_pth"]

# Containers (dict, list, tuple) nest at most this deep.  Checkpoints nest a few
# levels (checkpoint -> optimizer -> state -> param id -> tensor); the limit keeps
# deliberately deep files from exhausting the stack of code that walks the result.
MAX_NESTING = 100
# The tensors built from one file take at most this many times the bytes of the
# storages they view.  Shared storages (tied weights, views of one buffer) need
# 1-2x; anything beyond 4x is an expanded or overlapping view that would make a
# small file allocate far more than its size once copied.
MAX_EXPANSION = 4
_MAX_DIMS = 64  # numpy's limit on dimensions
_INT64 = 2**63  # torch sizes, strides, offsets and element counts are int64
_MAX_GLOBAL_LINE = 256  # longest 'module\n' or 'name\n' line GLOBAL may carry
_MAX_PROTOCOL = 5  # pickle.HIGHEST_PROTOCOL of Python 3.8+


@dataclasses.dataclass(frozen=True)
class _Global:
    """What a GLOBAL opcode pushes for an allowed ``module.name``: an immutable marker."""

    name: str
    dtype: np.dtype | None = None  # storage classes: the element type of their bytes


_CALLABLE_GLOBALS = ("torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter",
                     "torch._utils._rebuild_parameter_with_state", "collections.OrderedDict",
                     "torch.Size", "torch.device")
# The complete allow-list: (module, name) -> marker.
_GLOBALS: dict[tuple[str, str], _Global] = {
    **{tuple(full.rsplit(".", 1)): _Global(full) for full in _CALLABLE_GLOBALS},
    ("torch", "UntypedStorage"): _Global("torch.UntypedStorage", np.dtype(np.uint8)),
    ("torch.storage", "UntypedStorage"): _Global("torch.storage.UntypedStorage",
                                                 np.dtype(np.uint8)),
    **{("torch", name): _Global(f"torch.{name}", dtype) for name, dtype in STORAGE_DTYPES.items()},
}
_SCALARS = (str, int, float, bool, type(None))  # also the allowed dict keys (or flat tuples)
_OPCODE_NAMES = {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes}


class _Bad(Exception):
    """A problem inside data.pkl; the interpreter adds the byte offset and opcode."""


@dataclasses.dataclass(eq=False)
class _Storage:
    key: str
    array: np.ndarray  # read-only, native byte order


@dataclasses.dataclass(eq=False)
class _Tensor:
    """A tensor's geometry on its storage; copied out only after the size budget is checked."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def materialise(self) -> np.ndarray:
        array = self.storage.array
        if 0 in self.size:
            return np.zeros(self.size, array.dtype)
        # a size-1 dimension's stride is never applied; zero keeps byte strides small
        strides = [0 if n == 1 else s * array.itemsize for n, s in zip(self.size, self.stride)]
        view = np.lib.stride_tricks.as_strided(array[self.offset:], shape=self.size,
                                               strides=strides, writeable=False)
        return np.array(view, order="C")  # own, contiguous, writeable memory


def _describe(obj: Any) -> str:
    """A short, non-recursive description of a value for error messages."""
    if type(obj) in _SCALARS or (type(obj) in (tuple, list) and len(obj) <= 8
                                 and all(type(v) in _SCALARS for v in obj)):
        text = repr(obj)
        return text if len(text) <= 60 else text[:57] + "..."
    if isinstance(obj, _Global):
        return f"global {obj.name}"
    if isinstance(obj, (tuple, list, dict)):
        return f"{type(obj).__name__} of {len(obj)}"
    return {_Storage: "a storage", _Tensor: "a tensor"}.get(type(obj), type(obj).__name__)


def _is_index(value: Any) -> bool:
    """A non-negative int64, as torch's sizes, strides, offsets and element counts are."""
    return type(value) is int and 0 <= value < _INT64


def _is_key(key: Any) -> bool:
    # Restricting keys to scalars and flat tuples of them keeps hash() from recursing.
    return type(key) in _SCALARS or (type(key) is tuple and all(type(k) in _SCALARS for k in key))


class _CappedFile:
    """A read-only file whose ``read(n)`` asks for at most the bytes that remain.

    zipfile passes sizes taken from the archive's headers to ``read``, and
    ``BufferedReader.read(n)`` allocates ``n`` bytes before reading: a damaged
    header claiming gigabytes would otherwise allocate gigabytes for a small file.
    """

    def __init__(self, f: io.BufferedReader, size: int):
        self._f, self._size = f, size

    def read(self, n: int | None = -1) -> bytes:
        left = max(self._size - self._f.tell(), 0)
        return self._f.read(left if n is None or n < 0 else min(n, left))

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def seekable(self) -> bool:
        return True


class _Reader:
    """One ``load_pth`` call: the open archive and everything built from it."""

    def __init__(self, path: str, zf: zipfile.ZipFile):
        self.path, self.zf = path, zf
        self.prefix = ""
        self.little_endian = True
        self.storages: dict[str, _Storage] = {}
        # dicts made by OrderedDict() in this file, by id (held here, so no other
        # object can take the same id): the only objects BUILD may target
        self.ordered: dict[int, dict] = {}
        self.storage_bytes = 0  # bytes of the storages read
        self.tensor_bytes = 0  # bytes the tensors built would take as arrays
        self.calls: dict[str, Callable[[tuple], Any]] = {
            "torch._utils._rebuild_tensor_v2": self.rebuild_tensor,
            "torch._utils._rebuild_parameter": self.rebuild_parameter,
            "torch._utils._rebuild_parameter_with_state": self.rebuild_parameter,
            "collections.OrderedDict": self.ordered_dict,
            "torch.Size": self.torch_size,
            "torch.device": self.torch_device,
        }

    def error(self, message: str) -> PthFormatError:
        return PthFormatError(f"{self.path}: {message}")

    # ------------------------------------------------------------------ records

    def record(self, name: str) -> bytes:
        """The bytes of record ``name``; raises ``_Bad`` (missing, compressed or damaged)."""
        try:
            info = self.zf.getinfo(name)
        except KeyError:
            raise _Bad(f"record {name} is missing") from None
        return self._read(info)

    def _read(self, info: zipfile.ZipInfo) -> bytes:
        if info.compress_type != zipfile.ZIP_STORED:
            raise _Bad(f"record {info.filename} is compressed (zip method {info.compress_type}); "
                       "torch.save stores records uncompressed (re-save the file with torch.save)")
        if info.file_size != info.compress_size:
            raise _Bad(f"record {info.filename} is damaged: stored with {info.compress_size} "
                       f"bytes but {info.file_size} bytes uncompressed")
        try:
            data = self.zf.read(info)
        except Exception as e:  # zipfile reports damage as BadZipFile, EOFError, struct.error...
            raise _Bad(f"record {info.filename} is damaged ({type(e).__name__}: {e})") from e
        if len(data) != info.file_size:
            raise _Bad(f"record {info.filename} is damaged: read {len(data)} bytes, "
                       f"its header says {info.file_size}")
        return data

    def storage(self, pid: Any) -> _Storage:
        """BINPERSID: ('storage', <storage class>, key, location, numel) -> the storage."""
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"
                and type(pid[1]) is _Global and pid[1].dtype is not None
                and type(pid[2]) is str and type(pid[3]) is str and _is_index(pid[4])):
            raise _Bad(f"persistent id is {_describe(pid)}" + (
                f" {tuple(_describe(v) for v in pid)}" if type(pid) is tuple and len(pid) < 8
                else "") + ", expected ('storage', <torch storage class>, key, location, numel)")
        _, kind, key, _location, numel = pid  # location ignored: everything loads to CPU
        dtype = kind.dtype
        known = self.storages.get(key)
        if known is not None:
            if known.array.dtype != dtype or known.array.size != numel:
                raise _Bad(f"storage {_describe(key)} is used as {numel} x {dtype} and as "
                           f"{known.array.size} x {known.array.dtype}; torch.save gives each "
                           "storage one type")
            return known
        name = f"{self.prefix}data/{key}"
        try:
            info = self.zf.getinfo(name)
        except KeyError:
            raise _Bad(f"storage {_describe(key)}: record {name[:200]} is missing") from None
        if info.file_size != numel * dtype.itemsize:  # checked before reading: numel is untrusted
            raise _Bad(f"storage {_describe(key)}: record {name} has {info.file_size} bytes, "
                       f"expected {numel} x {dtype.itemsize}")
        raw = self._read(info)
        if dtype == np.bool_:
            array = np.frombuffer(raw, np.uint8) != 0  # any non-zero byte is True, as in torch
        else:
            array = np.frombuffer(raw, dtype)
            if dtype.itemsize > 1 and self.little_endian != (sys.byteorder == "little"):
                array = array.byteswap()
        array.flags.writeable = False
        self.storage_bytes += len(raw)
        self.storages[key] = _Storage(key, array)
        return self.storages[key]

    # ------------------------------------------------------------ allowed calls

    def rebuild_tensor(self, args: tuple) -> _Tensor:
        if not 4 <= len(args) <= 7:
            raise _Bad(f"_rebuild_tensor_v2 takes 4 to 7 arguments, got {len(args)}")
        storage, offset, size, stride = args[:4]
        if type(storage) is not _Storage:
            raise _Bad(f"tensor storage is {_describe(storage)}, not a storage")
        where = f"tensor on storage {_describe(storage.key)}"
        if not (_is_index(offset) and type(size) is tuple and type(stride) is tuple
                and len(size) == len(stride) <= _MAX_DIMS
                and all(_is_index(v) for v in size + stride)):
            raise _Bad(f"{where} has geometry offset={_describe(offset)} size={_describe(size)} "
                       f"stride={_describe(stride)}; expected non-negative int64 offset, sizes "
                       f"and strides, as many strides as sizes, at most {_MAX_DIMS} dimensions")
        array = storage.array
        numel = math.prod(size)
        if numel:
            last = offset + sum((n - 1) * s for n, s in zip(size, stride))
            if last >= array.size:
                raise _Bad(f"{where} (offset={offset}, size={size}, stride={stride}) reads past "
                           f"its storage of {array.size} elements")
        elif math.prod(n for n in size if n) * array.itemsize >= 2**62:
            raise _Bad(f"{where}: empty tensor of size {size} is too large for numpy")
        self.tensor_bytes += numel * array.itemsize
        return _Tensor(storage, offset, size, stride)

    def rebuild_parameter(self, args: tuple) -> _Tensor:
        # (data, requires_grad, backward_hooks[, state]): a Parameter is its data here
        if len(args) not in (3, 4) or type(args[0]) is not _Tensor:
            first = _describe(args[0] if args else None)
            raise _Bad(f"_rebuild_parameter expects (tensor, requires_grad, hooks[, state]), got "
                       f"{len(args)} arguments starting with {first}")
        if len(args) == 4 and args[3]:
            raise _Bad("nn.Parameter carries extra Python state; not supported")
        return args[0]

    def ordered_dict(self, args: tuple) -> dict:
        if args:
            raise _Bad(f"OrderedDict() expects no arguments, got {len(args)}")
        result: dict = {}
        self.ordered[id(result)] = result
        return result

    def torch_size(self, args: tuple) -> tuple:
        if len(args) != 1 or type(args[0]) not in (tuple, list) or \
                not all(_is_index(v) for v in args[0]):
            raise _Bad("torch.Size expects one sequence of non-negative ints")
        return tuple(args[0])

    def torch_device(self, args: tuple) -> str:
        if not (1 <= len(args) <= 2 and type(args[0]) is str
                and (len(args) == 1 or args[1] is None or type(args[1]) is int)):
            raise _Bad("torch.device expects (type, [index])")
        return args[0] if len(args) == 1 or args[1] is None else f"{args[0]}:{args[1]}"

    # -------------------------------------------------------------- interpreter

    def unpickle(self, data: bytes, member: str) -> Any:
        """Runs data.pkl; returns its object with ``_Tensor`` and ``_Storage`` placeholders."""
        stack: list = []
        metastack: list[list] = []
        memo: dict[int, Any] = {}
        pos, end, start, op = 0, len(data), 0, -1

        def take(n: int) -> bytes:
            nonlocal pos
            if pos + n > end:
                raise _Bad(f"needs {n} argument bytes, {end - pos} left (data.pkl is truncated)")
            pos += n
            return data[pos - n:pos]

        def pop_mark() -> list:
            nonlocal stack
            if not metastack:
                raise _Bad("no MARK before it")
            items, stack = stack, metastack.pop()
            return items

        def target(kind: type) -> Any:
            if type(stack[-1]) is not kind:
                raise _Bad(f"target is {_describe(stack[-1])}, expected a {kind.__name__}")
            return stack[-1]

        def check_key(key: Any) -> None:
            if not _is_key(key):
                raise _Bad(f"dict key is a {type(key).__name__} ({_describe(key)}); expected a "
                           "string, number, bool, None or a flat tuple of those")

        try:
            while True:
                if pos >= end:
                    raise _Bad("data.pkl ends without a STOP opcode (truncated)")
                start, op = pos, data[pos]
                pos += 1
                if op == 0x71:  # BINPUT
                    memo[take(1)[0]] = stack[-1]
                elif op == 0x72:  # LONG_BINPUT
                    memo[struct.unpack("<I", take(4))[0]] = stack[-1]
                elif op in (0x68, 0x6A):  # BINGET, LONG_BINGET
                    index = take(1)[0] if op == 0x68 else struct.unpack("<I", take(4))[0]
                    if index not in memo:
                        raise _Bad(f"memo slot {index} was never stored")
                    stack.append(memo[index])
                elif op == 0x28:  # MARK
                    if len(metastack) >= 2 * MAX_NESTING:
                        raise _Bad(f"more than {2 * MAX_NESTING} MARKs open (objects nest "
                                   f"at most {MAX_NESTING} levels)")
                    metastack.append(stack)
                    stack = []
                elif op == 0x58:  # BINUNICODE
                    stack.append(take(struct.unpack("<I", take(4))[0]).decode("utf-8",
                                                                              "surrogatepass"))
                elif op == 0x55:  # SHORT_BINSTRING (torch.load decodes it as UTF-8)
                    stack.append(take(take(1)[0]).decode("utf-8"))
                elif op == 0x4B:  # BININT1
                    stack.append(take(1)[0])
                elif op == 0x4D:  # BININT2
                    stack.append(struct.unpack("<H", take(2))[0])
                elif op == 0x4A:  # BININT
                    stack.append(struct.unpack("<i", take(4))[0])
                elif op == 0x8A:  # LONG1
                    stack.append(int.from_bytes(take(take(1)[0]), "little", signed=True))
                elif op == 0x47:  # BINFLOAT
                    stack.append(struct.unpack(">d", take(8))[0])
                elif op == 0x4E:  # NONE
                    stack.append(None)
                elif op in (0x88, 0x89):  # NEWTRUE, NEWFALSE
                    stack.append(op == 0x88)
                elif op == 0x29:  # EMPTY_TUPLE
                    stack.append(())
                elif op == 0x5D:  # EMPTY_LIST
                    stack.append([])
                elif op == 0x7D:  # EMPTY_DICT
                    stack.append({})
                elif op == 0x74:  # TUPLE
                    items = pop_mark()
                    stack.append(tuple(items))
                elif op in (0x85, 0x86, 0x87):  # TUPLE1, TUPLE2, TUPLE3
                    n = op - 0x84
                    if len(stack) < n:
                        raise IndexError
                    stack[-n:] = [tuple(stack[-n:])]
                elif op == 0x61:  # APPEND
                    item = stack.pop()
                    target(list).append(item)
                elif op == 0x65:  # APPENDS
                    items = pop_mark()
                    target(list).extend(items)
                elif op == 0x73:  # SETITEM
                    value, key = stack.pop(), stack.pop()
                    check_key(key)
                    target(dict)[key] = value
                elif op == 0x75:  # SETITEMS
                    items = pop_mark()
                    if len(items) % 2:
                        raise _Bad(f"{len(items)} items after MARK, expected key/value pairs")
                    d = target(dict)
                    for i in range(0, len(items), 2):
                        check_key(items[i])
                        d[items[i]] = items[i + 1]
                elif op == 0x63:  # GLOBAL
                    lines = []
                    for _ in range(2):
                        nl = data.find(b"\n", pos, min(end, pos + _MAX_GLOBAL_LINE))
                        if nl < 0:
                            raise _Bad("GLOBAL without a newline-terminated module and name")
                        lines.append(data[pos:nl].decode("utf-8"))
                        pos = nl + 1
                    module, name = lines
                    if (module, name) not in _GLOBALS:
                        raise _Bad(f"refusing to load global '{module[:80]}.{name[:80]}': only "
                                   "tensors and plain containers are allowed")
                    stack.append(_GLOBALS[(module, name)])
                elif op == 0x51:  # BINPERSID
                    stack.append(self.storage(stack.pop()))
                elif op == 0x52:  # REDUCE
                    args, func = stack.pop(), stack[-1]
                    call = self.calls.get(func.name) if type(func) is _Global else None
                    if call is None:
                        raise _Bad(f"REDUCE calls {_describe(func)}; only "
                                   f"{', '.join(_CALLABLE_GLOBALS)} may be called")
                    if type(args) is not tuple:
                        raise _Bad(f"REDUCE arguments are {_describe(args)}, expected a tuple")
                    stack[-1] = call(args)
                elif op == 0x62:  # BUILD
                    state, inst = stack.pop(), stack[-1]
                    if self.ordered.get(id(inst)) is not inst or type(state) is not dict:
                        raise _Bad(f"BUILD sets state {_describe(state)} on {_describe(inst)}; "
                                   "only an OrderedDict's attribute dict may be set")
                    # state_dict()'s `_metadata` (module versions): irrelevant here, dropped
                elif op == 0x80:  # PROTO
                    if take(1)[0] > _MAX_PROTOCOL:
                        raise _Bad(f"unknown pickle protocol {data[pos - 1]}")
                elif op == 0x2E:  # STOP
                    return stack.pop()
                else:
                    raise _Bad("opcode not supported: torch.save writes protocol-2 pickles of "
                               "tensors and containers")
        except IndexError:
            message = "needs more values on the stack than there are"
        except (_Bad, struct.error, UnicodeDecodeError) as e:
            message = str(e)
        except Exception as e:  # anything unforeseen still names the file and the place
            message = f"{type(e).__name__}: {e}"
        opname = _OPCODE_NAMES.get(op, f"0x{op:02x}")
        raise self.error(f"{member} byte {start} ({opname}): {message}")

    # ------------------------------------------------------------------- result

    def finish(self, obj: Any, member: str) -> Any:
        """Placeholders -> arrays, after checking nesting, cycles and the size budget."""
        if self.tensor_bytes > MAX_EXPANSION * self.storage_bytes:
            raise self.error(
                f"{member}: its tensors would take {self.tensor_bytes} bytes as arrays, more than "
                f"{MAX_EXPANSION} x the {self.storage_bytes} bytes of the storages they view "
                "(zero-stride or overlapping views); refusing to expand them")
        done: dict[int, Any] = {}
        entered: set[int] = set()

        def walk(o: Any, depth: int) -> Any:
            kind = type(o)
            if kind in _SCALARS:
                return o
            if id(o) in done:
                return done[id(o)]
            if id(o) in entered:
                raise self.error(f"{member}: a {kind.__name__} contains itself")
            if depth >= MAX_NESTING:
                raise self.error(f"{member}: containers nest deeper than {MAX_NESTING} levels")
            if kind is _Tensor:
                result = o.materialise()
            elif kind is _Storage:  # a bare storage: its elements
                result = np.array(o.array)
            elif kind in (dict, list, tuple):
                entered.add(id(o))
                if kind is dict:
                    result = {k: walk(v, depth + 1) for k, v in o.items()}
                else:
                    result = kind(walk(v, depth + 1) for v in o)
                entered.discard(id(o))
            else:
                raise self.error(f"{member}: the object holds {_describe(o)}, which has no "
                                 "value outside torch (only containers, strings, numbers and "
                                 "tensors)")
            done[id(o)] = result
            return result

        return walk(obj, 0)

    def load(self) -> Any:
        names = self.zf.namelist()
        repeated = sorted(n for n, count in collections.Counter(names).items() if count > 1)
        if repeated:
            raise self.error(f"zip lists records more than once: {', '.join(repeated[:5])}")
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise self.error(f"expected exactly one '<name>/data.pkl' in the zip, found "
                             f"{len(pickles)}; is this a torch.save checkpoint?")
        member = pickles[0]
        self.prefix = member[: -len("data.pkl")]
        try:
            byteorder = (self.record(self.prefix + "byteorder")
                         if self.prefix + "byteorder" in names else b"little")
            data = self.record(member)
        except _Bad as e:
            raise self.error(str(e)) from None
        if byteorder not in (b"little", b"big"):
            raise self.error(f"record {self.prefix}byteorder is {byteorder[:20]!r}, "
                             "expected b'little' or b'big'")
        self.little_endian = byteorder == b"little"
        return self.finish(self.unpickle(data, member), member)


def _open_zip(path: str, f: _CappedFile, size: int) -> zipfile.ZipFile:
    """The archive, or a PthFormatError saying what the file is instead."""
    head = f.read(len(LEGACY_MAGIC))
    f.seek(0)
    try:
        is_zip = zipfile.is_zipfile(f)
    except Exception:  # e.g. BadZipFile for a damaged zip64 record: ZipFile() says more
        is_zip = True
    if not is_zip:
        if size == 0:
            raise PthFormatError(f"{path}: empty file (0 bytes); expected a PyTorch zip checkpoint")
        if head.startswith(b"PK\x03\x04"):
            raise PthFormatError(
                f"{path}: truncated or damaged zip archive ({size} bytes): it starts like a zip "
                "but has no end-of-central-directory record, as when a download or copy is cut "
                "short; fetch or save the file again")
        raise PthFormatError(
            f"{path}: not a zip archive"
            + (" (it is the legacy pre-1.6 torch.save format)" if head == LEGACY_MAGIC else "")
            + "; expected a PyTorch zip checkpoint - re-save it with torch>=1.6 "
            "via `torch.save(obj, f)`")
    f.seek(0)
    try:
        return zipfile.ZipFile(f)
    except Exception as e:  # zipfile reports damage as BadZipFile, ValueError, EOFError...
        raise PthFormatError(f"{path}: damaged zip archive ({size} bytes): "
                             f"{type(e).__name__}: {e}") from e


def load_pth(path: str | os.PathLike) -> Any:
    """Load a torch>=1.6 ``.pth`` file; tensors become C-contiguous numpy arrays.

    ``OrderedDict`` (e.g. ``state_dict()``) comes back as a plain ``dict`` in the
    same order; an object referenced twice in the file is one object in the
    result.  Raises ``FileNotFoundError`` if ``path`` does not exist, ``OSError``
    if it cannot be read, and ``PthFormatError`` for anything wrong with its
    contents (see the module docstring for the limits).  Loading has no effect
    on later loads.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(2, "No such .pth file", path)
    with open(path, "rb") as raw:
        size = os.fstat(raw.fileno()).st_size
        with _open_zip(path, _CappedFile(raw, size), size) as zf:
            return _Reader(path, zf).load()
