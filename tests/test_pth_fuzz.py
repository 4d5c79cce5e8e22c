"""Seeded mutations of valid .pth files: each loads or fails with PthFormatError.

Mutations act on the zip (byte flips, truncation, inserted and deleted bytes), on
data.pkl re-zipped so the zip layer is valid (byte edits, whole opcodes deleted,
duplicated, swapped or replaced, integer arguments changed, globals swapped) and
on the storage geometry (numel, offset, sizes and strides of tensors).  Some
mutations are harmless by construction (zip padding, record order, a tensor's
device) and must load exactly like the original.  Each load runs under a timer
(no hang) and tracemalloc (allocation bounded by a multiple of the file size).
"""
import io
import pickletools
import random
import signal
import struct
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from allspark_jax.errors import PthFormatError
from allspark_jax.weights import pth_reader
from allspark_jax.weights.pth_reader import load_pth
from allspark_jax.weights.pth_writer import save_pth

DATA = Path(__file__).parent / "data"
SEED = 1234
MUTANTS = 288
SECONDS_PER_LOAD = 10
# A valid load holds the file's storages, their copies and zipfile's buffers; a
# hostile one may add MAX_EXPANSION x its storage bytes.  Anything beyond this
# bound means a header or pickle size was trusted.
ALLOC_FACTOR = pth_reader.MAX_EXPANSION + 4
ALLOC_SLACK = 8 << 20

OTHER_GLOBALS = [b"torch\nLongStorage\n", b"torch\nIntStorage\n", b"torch\nHalfStorage\n",
                 b"torch\nUntypedStorage\n", b"collections\nOrderedDict\n", b"torch\nSize\n",
                 b"torch._utils\n_rebuild_parameter\n", b"os\nsystem\n", b"builtins\neval\n",
                 b"numpy\nndarray\n", b"torch\nload\n"]


class _Hang(Exception):
    pass


def _records(raw: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        return [(info.filename, zf.read(info)) for info in zf.infolist()]


def _zip(records) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for name, data in records:
            zf.writestr(name, data)
    return out.getvalue()


def _encode_int(v: int) -> bytes:
    if 0 <= v < 0x100:
        return b"K" + bytes([v])
    if 0 <= v < 0x10000:
        return b"M" + struct.pack("<H", v)
    if -(2**31) <= v < 2**31:
        return b"J" + struct.pack("<i", v)
    data = v.to_bytes(v.bit_length() // 8 + 1, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


class Base:
    """A valid file, its records, its data.pkl split into opcodes, and what it loads as."""

    def __init__(self, path: Path):
        self.path, self.raw = path, path.read_bytes()
        self.records = _records(self.raw)
        self.pkl_index = next(i for i, (n, _) in enumerate(self.records) if n.endswith("data.pkl"))
        self.pkl = self.records[self.pkl_index][1]
        ops = list(pickletools.genops(self.pkl))
        ends = [pos for _, _, pos in ops[1:]] + [len(self.pkl)]
        self.ops = [(op.name, arg, pos, end) for (op, arg, pos), end in zip(ops, ends)]
        self.ints = [i for i, (name, *_) in enumerate(self.ops)
                     if name in ("BININT", "BININT1", "BININT2", "LONG1")]
        self.geometry = self._geometry_ints()
        self.paddings = self._padding_bytes()
        self.loaded = load_pth(path)

    def _geometry_ints(self) -> list[int]:
        """Indices of the int opcodes giving tensors' numel, offset, sizes and strides."""
        found = []
        for i, (name, *_) in enumerate(self.ops):
            if name != "BINPERSID":
                continue
            j = i - 1  # numel: the last int before the persistent id's TUPLE
            while j > 0 and self.ops[j][0] not in ("BININT", "BININT1", "BININT2", "LONG1"):
                j -= 1
            found.append(j)
            j = i + 1  # offset, sizes, strides: ints up to requires_grad
            while j < len(self.ops) and self.ops[j][0] not in ("NEWFALSE", "NEWTRUE"):
                if j in self.ints:
                    found.append(j)
                j += 1
        return found

    def _padding_bytes(self) -> list[int]:
        """Offsets of padding bytes in local-header extra fields (zip readers skip them)."""
        offsets = []
        with zipfile.ZipFile(io.BytesIO(self.raw)) as zf:
            for info in zf.infolist():
                start = info.header_offset
                name_len, extra_len = struct.unpack("<HH", self.raw[start + 26:start + 30])
                extra = start + 30 + name_len
                if extra_len > 4 and self.raw[extra:extra + 2] == b"FB":
                    offsets.extend(range(extra + 4, extra + extra_len))
        return offsets

    def with_pkl(self, pkl: bytes) -> bytes:
        records = list(self.records)
        records[self.pkl_index] = (records[self.pkl_index][0], pkl)
        return _zip(records)

    def splice(self, op_index: int, replacement: bytes) -> bytes:
        _, _, start, end = self.ops[op_index]
        return self.pkl[:start] + replacement + self.pkl[end:]


def _mutants(rng: random.Random, bases: list[Base]):
    """Yields (description, file bytes, the base it must load as, or None)."""
    for n in range(MUTANTS):
        base = bases[n % len(bases)]
        raw, pkl, kind = base.raw, base.pkl, n // len(bases) % 12
        if kind == 0:  # zip: flip bits of a byte, half of them in the last 4 KiB (directory)
            pos = rng.randrange(len(raw)) if rng.random() < 0.5 else \
                rng.randrange(max(0, len(raw) - 4096), len(raw))
            mutated = bytearray(raw)
            mutated[pos] ^= rng.randrange(1, 256)
            yield f"zip byte {pos} flipped", bytes(mutated), None
        elif kind == 1:  # zip: truncated
            keep = rng.randrange(len(raw))
            yield f"zip truncated to {keep} bytes", raw[:keep], None
        elif kind == 2:  # zip: bytes inserted or deleted
            pos, count = rng.randrange(len(raw)), rng.randrange(1, 17)
            if rng.random() < 0.5:
                yield (f"zip: {count} bytes inserted at {pos}",
                       raw[:pos] + rng.randbytes(count) + raw[pos:], None)
            else:
                yield f"zip: {count} bytes deleted at {pos}", raw[:pos] + raw[pos + count:], None
        elif kind == 3:  # harmless: padding in a local header, or the records' order
            if base.paddings and rng.random() < 0.7:
                pos = rng.choice(base.paddings)
                mutated = bytearray(raw)
                mutated[pos] ^= rng.randrange(1, 256)
                yield f"zip padding byte {pos} changed", bytes(mutated), base
            else:
                records = list(base.records)
                rng.shuffle(records)
                yield "records re-zipped in another order", _zip(records), base
        elif kind == 4:  # data.pkl: a byte flipped, re-zipped
            pos = rng.randrange(len(pkl))
            mutated = bytearray(pkl)
            mutated[pos] ^= rng.randrange(1, 256)
            yield f"data.pkl byte {pos} flipped", base.with_pkl(bytes(mutated)), None
        elif kind == 5:  # data.pkl: truncated, bytes inserted or deleted
            pos, count = rng.randrange(len(pkl)), rng.randrange(1, 9)
            choice = rng.randrange(3)
            if choice == 0:
                yield f"data.pkl truncated to {pos}", base.with_pkl(pkl[:pos]), None
            elif choice == 1:
                yield (f"data.pkl: {count} bytes inserted at {pos}",
                       base.with_pkl(pkl[:pos] + rng.randbytes(count) + pkl[pos:]), None)
            else:
                yield (f"data.pkl: {count} bytes deleted at {pos}",
                       base.with_pkl(pkl[:pos] + pkl[pos + count:]), None)
        elif kind == 6:  # data.pkl: a whole opcode deleted, duplicated or swapped with the next
            i = rng.randrange(len(base.ops) - 1)
            name, _, start, end = base.ops[i]
            _, _, _, next_end = base.ops[i + 1]
            op_bytes, next_bytes = pkl[start:end], pkl[end:next_end]
            choice = rng.randrange(3)
            if choice == 0:
                yield (f"data.pkl: {name} at {start} deleted",
                       base.with_pkl(base.splice(i, b"")), None)
            elif choice == 1:
                yield (f"data.pkl: {name} at {start} duplicated",
                       base.with_pkl(base.splice(i, op_bytes * 2)), None)
            else:
                yield (f"data.pkl: {name} at {start} swapped with the next opcode",
                       base.with_pkl(pkl[:start] + next_bytes + op_bytes + pkl[next_end:]), None)
        elif kind == 7:  # data.pkl: an opcode replaced by another opcode byte (arguments kept)
            i = rng.randrange(len(base.ops))
            name, _, start, _ = base.ops[i]
            code = rng.choice(pickletools.opcodes).code.encode("latin-1")
            yield (f"data.pkl: {name} at {start} replaced by opcode {code!r}",
                   base.with_pkl(pkl[:start] + code + pkl[start + 1:]), None)
        elif kind == 8:  # data.pkl: an integer argument changed
            i = rng.choice(base.ints)
            value = base.ops[i][1]
            new = rng.choice([0, 1, -1, value + 1, value - 1, 2 * value, 255, 2**16, 2**31 - 1,
                              -(2**31), 2**40, 2**63, rng.randrange(-1000, 1000)])
            yield (f"data.pkl: int {value} at {base.ops[i][2]} -> {new}",
                   base.with_pkl(base.splice(i, _encode_int(new))), None)
        elif kind in (9, 10):  # storage geometry: numel, offset, a size or a stride changed
            i = rng.choice(base.geometry)
            value = base.ops[i][1]
            new = rng.choice([0, 1, -1, value + 1, value - 1, value * 2, value * 64, 2**20,
                              2**31 - 1, 2**40, 2**62])
            yield (f"geometry: int {value} at {base.ops[i][2]} -> {new}",
                   base.with_pkl(base.splice(i, _encode_int(new))), None)
        else:  # globals swapped; or harmless: tensors saved from another device
            globals_at = [i for i, (name, *_) in enumerate(base.ops) if name == "GLOBAL"]
            if rng.random() < 0.7:
                i = rng.choice(globals_at)
                new = rng.choice(OTHER_GLOBALS)
                yield (f"data.pkl: GLOBAL {base.ops[i][1]!r} -> {new!r}",
                       base.with_pkl(base.splice(i, b"c" + new)), None)
            elif "cpu" not in _strings(base.loaded):  # 'cpu' only names storage locations
                moved = pkl.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
                yield "location 'cpu' -> 'cuda:0'", base.with_pkl(moved), base
            else:
                yield "data.pkl re-zipped as it was", base.with_pkl(pkl), base


def _strings(obj) -> set:
    if type(obj) is str:
        return {obj}
    if type(obj) in (dict, list, tuple):
        items = list(obj.items()) if type(obj) is dict else obj
        return set().union(*map(_strings, items)) if items else set()
    return set()


def _check_plain(obj, where="result"):
    """Only containers, scalars and arrays that own C-contiguous, writeable memory."""
    if isinstance(obj, np.ndarray):
        assert obj.flags.c_contiguous and obj.flags.owndata and obj.flags.writeable, where
    elif type(obj) in (dict, list, tuple):
        items = obj.items() if type(obj) is dict else enumerate(obj)
        for key, value in items:
            _check_plain(value, f"{where}[{key!r}]")
    else:
        assert type(obj) in (str, int, float, bool, type(None)), (where, type(obj))


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and np.array_equal(a, b, equal_nan=True))
    if type(a) is not type(b):
        return False
    if type(a) is dict:
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if type(a) in (list, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    small = tmp_path_factory.mktemp("fuzz") / "small.pth"
    shared = np.arange(4, dtype=np.int64)
    save_pth({"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
              "h": np.ones(3, np.float16), "b": np.array([True, False]),
              "opt": {"state": {0: {"exp_avg": shared}}, "p": [shared]},
              "epoch": 3, "lr": 0.01, "name": "x"}, small)
    return [Base(DATA / "allspark_tiny_official_checkpoint.pth"),
            Base(DATA / "mit_tiny_imagenet.pth"), Base(DATA / "torch_views.pth"), Base(small)]


def test_mutated_files_load_or_raise_pth_format_error(tmp_path, bases):
    rng = random.Random(SEED)
    path = tmp_path / "mutant.pth"
    problems, outcomes = [], {"loaded": 0, "PthFormatError": 0}

    def on_alarm(signum, frame):
        raise _Hang

    previous = signal.signal(signal.SIGALRM, on_alarm)
    started = time.perf_counter()
    try:
        for description, data, same_as in _mutants(rng, bases):
            path.write_bytes(data)
            tracemalloc.start()  # traced only while loading: tracing slows Python ~5x
            signal.setitimer(signal.ITIMER_REAL, SECONDS_PER_LOAD)
            try:
                result = load_pth(path)
                outcome = "loaded"
            except PthFormatError as e:
                outcome = "PthFormatError"
                if not str(e).startswith(f"{path}: "):
                    problems.append(f"{description}: message does not name the file: {e}")
            except _Hang:
                outcome = f"no answer within {SECONDS_PER_LOAD} s"
            except Exception as e:  # noqa: BLE001 - the point of the test
                outcome = f"{type(e).__name__}: {str(e)[:200]}"
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                allocated = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
            if allocated > ALLOC_FACTOR * len(data) + ALLOC_SLACK:
                problems.append(f"{description}: allocated {allocated} bytes for a "
                                f"{len(data)}-byte file")
            if outcome == "loaded":
                try:
                    _check_plain(result)
                except AssertionError as e:
                    problems.append(f"{description}: loaded a non-plain value at {e}")
                if same_as is not None and not _same(result, same_as.loaded):
                    problems.append(f"{description}: harmless, but loads differently")
                del result
            elif same_as is not None:
                problems.append(f"{description}: harmless, but failed to load ({outcome})")
            if outcome in outcomes:
                outcomes[outcome] += 1
            else:
                problems.append(f"{description}: {outcome}")
    finally:
        signal.signal(signal.SIGALRM, previous)
    elapsed = time.perf_counter() - started
    print(f"{MUTANTS} mutants in {elapsed:.1f} s: {outcomes}")
    assert not problems, "\n".join(problems)
    assert outcomes["loaded"] > 0 and outcomes["PthFormatError"] > MUTANTS // 2, outcomes
    for base in bases:  # no load left anything behind for the next one
        assert _same(load_pth(base.path), base.loaded), base.path
