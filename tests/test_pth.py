"""Tests for allspark_jax.weights.pth_reader / pth_writer (torch-free .pth reading/writing)."""

import struct
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from allspark_jax.errors import PthFormatError
from allspark_jax.weights import pth_reader
from allspark_jax.weights.pth_reader import load_pth
from allspark_jax.weights.pth_writer import save_pth

DATA = Path(__file__).parent / "data"
CHECKPOINT = DATA / "allspark_tiny_official_checkpoint.pth"
MIT = DATA / "mit_tiny_imagenet.pth"

DTYPES = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16, np.int64, np.int32,
          np.int16, np.int8, np.uint8, np.bool_]


@pytest.fixture(scope="module")
def npz_state():
    with np.load(DATA / "allspark_tiny.npz") as npz:
        return {k[len("state0/"):]: npz[k] for k in npz.files if k.startswith("state0/")}


def assert_same_array(got, want, name):
    assert isinstance(got, np.ndarray), name
    assert got.dtype == want.dtype and got.shape == want.shape, (name, got.dtype, want.dtype)
    assert np.array_equal(got, want), name


def test_official_checkpoint_matches_npz(npz_state):
    ckpt = load_pth(CHECKPOINT)
    assert type(ckpt) is dict
    assert list(ckpt) == ["model", "optimizer", "epoch", "best_epoch", "previous_best"]
    model = ckpt["model"]
    assert type(model) is dict  # OrderedDict comes back as a plain dict
    assert set(model) == {"module." + k for k in npz_state}
    for name, want in npz_state.items():
        assert_same_array(model["module." + name], want, name)
    int_keys = [k for k in model if k.endswith(("queue_ptr", "num_batches_tracked"))]
    assert int_keys and all(model[k].dtype == np.int64 for k in int_keys)
    assert all(v.flags.c_contiguous for v in model.values())


def test_mit_pretrained_matches_npz(npz_state):
    mit = load_pth(MIT)
    assert "head.weight" in mit and "head.bias" in mit
    backbone = {k[len("backbone."):]: v for k, v in npz_state.items() if k.startswith("backbone.")}
    assert backbone and set(backbone) <= set(mit)
    for name, want in backbone.items():
        assert_same_array(mit[name], want, name)


def test_torch_written_views_load_as_copies():
    """tests/data/torch_views.pth, written by torch 2.13's torch.save of this OrderedDict:

        base = torch.arange(24.)
        expanded=torch.arange(3.).expand(4, 3), view=base[5:17].view(3, 4), t=base.view(4, 6).t(),
        tied_a=base, tied_b=base, strided=base.view(4, 6)[::2, 1::3],
        bf=torch.tensor([1.5, -2.0, 3.25]).to(torch.bfloat16), b=torch.tensor([True, False]),
        p=torch.nn.Parameter(torch.ones(2)), i8=torch.tensor([-1, 2], dtype=torch.int8),
        empty=torch.zeros(0, 5), scalar=torch.tensor(3.5), size=torch.Size([2, 3]),
        device=torch.device("cpu")
    """
    got = load_pth(DATA / "torch_views.pth")
    base = np.arange(24, dtype=np.float32)
    want = {"expanded": np.tile(np.arange(3, dtype=np.float32), (4, 1)),
            "view": base[5:17].reshape(3, 4), "t": base.reshape(4, 6).T, "tied_a": base,
            "tied_b": base, "strided": base.reshape(4, 6)[::2, 1::3],
            "bf": np.array([1.5, -2.0, 3.25], ml_dtypes.bfloat16), "b": np.array([True, False]),
            "p": np.ones(2, np.float32), "i8": np.array([-1, 2], np.int8),
            "empty": np.zeros((0, 5), np.float32), "scalar": np.array(3.5, np.float32)}
    assert list(got) == list(want) + ["size", "device"]
    for name, value in want.items():
        assert_same_array(got[name], value, name)
        assert got[name].flags.c_contiguous and got[name].flags.owndata, name
    assert got["tied_a"] is got["tied_b"]  # one tensor pickled twice stays one array
    assert got["size"] == (2, 3) and got["device"] == "cpu"


def _sample(dtype, shape):
    rng = np.random.default_rng(0)
    return (rng.standard_normal(shape) * 100).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_round_trip_dtype(tmp_path, dtype):
    arrays = {
        "matrix": _sample(dtype, (3, 4)),
        "scalar": np.asarray(_sample(dtype, ())),
        "empty": np.zeros((2, 0, 3), dtype),
        "transposed": _sample(dtype, (4, 5)).T,  # non-contiguous input
        "strided": _sample(dtype, (6, 6))[::2, 1::3],
    }
    save_pth(arrays, tmp_path / "x.pth")
    back = load_pth(tmp_path / "x.pth")
    assert list(back) == list(arrays)
    for name, want in arrays.items():
        assert_same_array(back[name], want, name)
        assert back[name].flags.c_contiguous


def test_round_trip_nested_containers(tmp_path):
    shared = np.arange(4, dtype=np.int64)
    obj = {
        "model": {"w": np.ones((2, 2), np.float32), "num_batches_tracked": np.array(7)},
        "optimizer": {"state": {0: {"step": np.array(3.0, np.float32), "exp_avg": shared}},
                      "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0],
                                        "amsgrad": False, "foreach": None}]},
        "epoch": 3, "huge": -(2**70), "big": 2**33, "neg": -1, "name": "allspark ✓",
        "nested": [[], (), {}, (1,), (1, 2), (1, 2, 3), (1, 2, 3, 4), [shared, shared]],
        "np_scalars": [np.float32(1.5), np.int64(-3), np.bool_(True), np.float64(0.25)],
    }
    save_pth(obj, tmp_path / "ckpt.pth")
    back = load_pth(tmp_path / "ckpt.pth")
    assert back["epoch"] == 3 and back["huge"] == -(2**70) and back["big"] == 2**33
    assert back["neg"] == -1 and back["name"] == "allspark ✓"
    assert back["optimizer"]["param_groups"] == obj["optimizer"]["param_groups"]
    assert back["optimizer"]["state"][0]["step"].dtype == np.float32
    assert back["nested"][:7] == [[], (), {}, (1,), (1, 2), (1, 2, 3), (1, 2, 3, 4)]
    for got in back["nested"][7]:
        assert_same_array(got, shared, "shared")
    for got, want in zip(back["np_scalars"], obj["np_scalars"]):
        assert_same_array(got, np.asarray(want), "np scalar")  # scalars become 0-d tensors
    assert_same_array(back["model"]["num_batches_tracked"], np.array(7, np.int64), "nbt")


def test_saved_layout_matches_torch(tmp_path):
    """Uncompressed records whose data starts 64-byte aligned, plus torch's metadata."""
    path = tmp_path / "layout.pth"
    save_pth({"a": np.ones(3, np.float32), "b": np.zeros(5, np.uint8)}, path)
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        names = zf.namelist()
        assert names[0] == "layout/data.pkl" and names[-1] == "layout/version"
        assert zf.read("layout/byteorder") == b"little"
        assert zf.read("layout/version") == b"3\n"
        assert zf.read("layout/.storage_alignment") == b"64"
        for info in zf.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:][:4])
            assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename
        assert zf.read("layout/data/0") == np.ones(3, np.float32).tobytes()
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_save_overwrites_and_rejects_unsupported(tmp_path):
    path = tmp_path / "x.pth"
    save_pth({"a": 1}, path)
    save_pth({"a": 2}, path)
    assert load_pth(path) == {"a": 2}
    with pytest.raises(TypeError, match="uint16"):
        save_pth({"w": np.zeros(2, np.uint16)}, path)
    with pytest.raises(TypeError, match="set"):
        save_pth({"w": {1, 2}}, path)
    assert load_pth(path) == {"a": 2}  # failed saves leave the old file intact
    assert list(tmp_path.iterdir()) == [path]


def _write_archive(path, pickle_bytes, storages=()):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("evil/data.pkl", pickle_bytes)
        for key, data in storages:
            zf.writestr(f"evil/data/{key}", data)


@pytest.mark.parametrize("module,name", [("os", "system"), ("builtins", "eval"),
                                         ("torch", "load")])
def test_restricted_unpickler_rejects_globals(tmp_path, module, name):
    path = tmp_path / "evil.pth"
    # protocol-0 pickle for os.system('touch pwned'): GLOBAL, MARK, STRING, TUPLE, REDUCE
    payload = f"c{module}\n{name}\n(S'touch {tmp_path}/pwned'\ntR.".encode()
    _write_archive(path, payload)
    with pytest.raises(PthFormatError, match=rf"{module}\.{name}") as err:
        load_pth(path)
    assert str(path) in str(err.value)
    assert not (tmp_path / "pwned").exists()


def test_rejects_tensor_reading_past_storage(tmp_path):
    path = tmp_path / "evil.pth"
    # a 5-element tensor on a 2-element storage: would read out of bounds
    payload = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storage"
               b"ctorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x02tQ"
               b"K\x00K\x05\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtR.")
    _write_archive(path, payload, [("0", b"\x00" * 8)])
    with pytest.raises(PthFormatError, match="past its storage"):
        load_pth(path)


def test_non_zip_files(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(PthFormatError, match=r"torch>=1\.6") as err:
        load_pth(garbage)
    assert str(garbage) in str(err.value)

    legacy = tmp_path / "legacy.pth"  # starts with the pre-1.6 pickled magic number
    legacy.write_bytes(bytes.fromhex("80028a0a6cfc9c46f9206aa85019") + b".")
    with pytest.raises(PthFormatError, match="legacy"):
        load_pth(legacy)

    no_pickle = tmp_path / "nopkl.pth"
    with zipfile.ZipFile(no_pickle, "w") as zf:
        zf.writestr("x/other.txt", "hi")
    with pytest.raises(PthFormatError, match="data.pkl"):
        load_pth(no_pickle)


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_pth(missing)


# ------------------------------------------------------------- hostile files
# Pickles are written opcode by opcode (protocol 2, as torch.save) so each test
# states exactly what the file contains.

def _int(v):
    return b"K" + bytes([v]) if 0 <= v < 256 else b"J" + struct.pack("<i", v)


def _str(s):
    data = s.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _tuple(*items):
    return b"(" + b"".join(items) + b"t"


def _tensor(key, numel, offset, size, stride, storage=b"FloatStorage"):
    """A _rebuild_tensor_v2 call as torch.save writes it."""
    pid = _tuple(_str("storage"), b"ctorch\n" + storage + b"\n", _str(key), _str("cpu"),
                 _int(numel))
    return (b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + b"Q" + _int(offset)
            + _tuple(*map(_int, size)) + _tuple(*map(_int, stride))
            + b"\x89ccollections\nOrderedDict\n)RtR")


def _pickle(body):
    return b"\x80\x02" + body + b"."


@pytest.fixture
def clean_file(tmp_path):
    """A small valid checkpoint and what it holds."""
    obj = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(3),
           "meta": {"epoch": 1}}
    path = tmp_path / "clean.pth"
    save_pth(obj, path)
    return path, obj


def assert_loads_as(path, obj):
    back = load_pth(path)
    assert back.keys() == obj.keys()
    for key, want in obj.items():
        if isinstance(want, np.ndarray):
            assert_same_array(back[key], want, key)
        else:
            assert back[key] == want, key


@pytest.mark.parametrize("target", [b"ctorch\nFloatStorage\n",
                                    b"ctorch._utils\n_rebuild_tensor_v2\n",
                                    b"ccollections\nOrderedDict\n", b"ctorch\nSize\n"])
def test_build_onto_a_stand_in_is_refused_and_later_loads_work(tmp_path, clean_file, target):
    """BUILD would set attributes on the object shared by every load (e.g. a storage's dtype)."""
    path = tmp_path / "evil.pth"
    state = _tuple(b"N", b"}" + _str("dtype") + _str("bad") + b"s")[1:-1] + b"\x86"
    _write_archive(path, _pickle(target + state + b"b"))
    with pytest.raises(PthFormatError, match=r"evil/data\.pkl byte \d+ \(BUILD\)") as err:
        load_pth(path)
    assert str(path) in str(err.value)
    assert_loads_as(*clean_file)  # nothing changed for the next load


def test_build_on_an_ordered_dict_keeps_only_its_items(tmp_path):
    """What state_dict() pickles: OrderedDict(), its items, then BUILD {'_metadata': ...}."""
    path = tmp_path / "sd.pth"
    body = (b"ccollections\nOrderedDict\n)R(" + _str("w") + _tensor("0", 2, 0, (2,), (1,))
            + b"u}" + _str("_metadata") + b"ccollections\nOrderedDict\n)Rsb")
    _write_archive(path, _pickle(body), [("0", np.float32([1, 2]).tobytes())])
    back = load_pth(path)
    assert type(back) is dict and list(back) == ["w"]
    assert_same_array(back["w"], np.float32([1, 2]), "w")


def test_flipped_byte_names_the_damaged_record(tmp_path, clean_file):
    path, _ = clean_file
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        infos = {info.filename: info for info in zf.infolist()}
    for record in ("clean/data.pkl", "clean/data/0"):
        info = infos[record]
        name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:][:4])
        start = info.header_offset + 30 + name_len + extra_len  # the record's data
        damaged = bytearray(raw)
        damaged[start + info.file_size // 2] ^= 0x10
        bad = tmp_path / "flipped.pth"
        bad.write_bytes(damaged)
        with pytest.raises(PthFormatError, match=rf"record {record} is damaged .*CRC") as err:
            load_pth(bad)
        assert str(bad) in str(err.value)


def test_nesting_is_bounded(tmp_path):
    path = tmp_path / "deep.pth"
    ok = []
    for _ in range(pth_reader.MAX_NESTING - 1):
        ok = [ok]
    save_pth(ok, path)
    assert load_pth(path) == ok  # MAX_NESTING levels load
    deep = {
        "lists": _pickle(b"]" * 100_000 + b"a" * 99_999),
        "tuples": _pickle(b"N" + b"\x85" * 100_000),
        "dicts": _pickle(b"}K\x00" * 150 + b"}" + b"s" * 150),
        "one too many": _pickle(b"]" * (pth_reader.MAX_NESTING + 1) + b"a" * pth_reader.MAX_NESTING),
    }
    for name, payload in deep.items():
        _write_archive(path, payload)
        with pytest.raises(PthFormatError, match=rf"nest deeper than {pth_reader.MAX_NESTING}"):
            load_pth(path)
    _write_archive(path, _pickle(b"(" * 10_000))
    with pytest.raises(PthFormatError, match="MARKs open"):
        load_pth(path)
    _write_archive(path, _pickle(b"]q\x00h\x00a"))  # a list appended to itself
    with pytest.raises(PthFormatError, match="contains itself"):
        load_pth(path)


def test_shared_objects_stay_shared(tmp_path):
    """A 60-level chain of [x, x] is 2**60 paths but 60 objects: loads at once, sharing kept."""
    path = tmp_path / "dag.pth"
    _write_archive(path, _pickle(b"]q\x00" + b"](h\x00h\x00eq\x00" * 60))
    back = load_pth(path)
    assert back[0] is back[1] and back[0][0] is back[0][1]


def test_zero_strides_cannot_blow_up_a_small_file(tmp_path):
    path = tmp_path / "bomb.pth"
    # one float viewed as 2**28 floats (1 GiB) through stride 0
    _write_archive(path, _pickle(_tensor("0", 1, 0, (2**28,), (0,))), [("0", b"\x00" * 4)])
    assert path.stat().st_size < 400
    with pytest.raises(PthFormatError, match=r"1073741824 bytes .* 4 bytes of the storages"):
        load_pth(path)
    # what torch.save writes for torch.arange(3.).expand(4, 3): within MAX_EXPANSION, loads
    _write_archive(path, _pickle(_tensor("0", 3, 0, (4, 3), (0, 1))),
                   [("0", np.float32([0, 1, 2]).tobytes())])
    assert pth_reader.MAX_EXPANSION * 3 >= 4 * 3
    assert_same_array(load_pth(path), np.tile(np.float32([0, 1, 2]), (4, 1)), "expanded")
    # overlapping views of one storage count against the same budget
    body = b"](" + _tensor("0", 3, 0, (3,), (1,)) * (pth_reader.MAX_EXPANSION + 1) + b"e"
    _write_archive(path, _pickle(body), [("0", np.float32([0, 1, 2]).tobytes())])
    with pytest.raises(PthFormatError, match="refusing to expand"):
        load_pth(path)


@pytest.mark.parametrize("offset,size,stride,match", [
    (0, (3,), (-1,), "non-negative"),
    (-1, (3,), (1,), "non-negative"),
    (2, (2,), (1,), "past its storage"),
    (0, (2, 2), (2, 1), "past its storage"),
    (0, (1,) * 65, (1,) * 65, "at most 64 dimensions"),
])
def test_tensor_geometry_must_lie_inside_its_storage(tmp_path, offset, size, stride, match):
    path = tmp_path / "geometry.pth"
    _write_archive(path, _pickle(_tensor("0", 3, offset, size, stride)), [("0", b"\x00" * 12)])
    with pytest.raises(PthFormatError, match=match) as err:
        load_pth(path)
    assert "storage '0'" in str(err.value)


@pytest.mark.parametrize("body,storages,match", [
    (b"\x95" + b"\x00" * 8 + b"N", [], r"byte 2 \(FRAME\): opcode not supported"),
    (b"a", [], r"byte 2 \(APPEND\): needs more values on the stack"),
    (b"h\x05", [], "memo slot 5 was never stored"),
    (b"X\xff\x00\x00\x00ab", [], "data.pkl is truncated"),
    (b"(", [], r"\(STOP\): needs more values on the stack"),
    (b"}]Ns", [], "dict key is a list"),
    (b"ctorch\nFloatStorage\n)R", [], "only .* may be called"),
    (b"ctorch\nsave\n", [], "refusing to load global 'torch.save'"),
    (_tuple(_str("storage"), _str("x")) + b"Q", [], "persistent id"),
    (_tensor("7", 3, 0, (3,), (1,)), [], r"storage '7': record evil/data/7 is missing"),
    (_tensor("0", 3, 0, (3,), (1,)), [("0", b"\x00" * 8)], "has 8 bytes, expected 3 x 4"),
    (b"]" + b"(" + _tensor("0", 2, 0, (2,), (1,)) + _tensor("0", 2, 0, (2,), (1,), b"LongStorage")
     + b"e", [("0", b"\x00" * 8)], "used as 2 x int64 and as 2 x float32"),
    (b"ctorch\nFloatStorage\n", [], "holds global torch.FloatStorage"),
])
def test_malformed_pickles_name_file_record_and_opcode(tmp_path, body, storages, match):
    path = tmp_path / "evil.pth"
    _write_archive(path, _pickle(body), storages)
    with pytest.raises(PthFormatError, match=match) as err:
        load_pth(path)
    assert str(err.value).startswith(f"{path}: ")
    assert "evil/data.pkl" in str(err.value)


def test_compressed_records_are_refused(tmp_path, clean_file):
    """A deflated record may expand ~1000x; torch.save never compresses."""
    src, _ = clean_file
    path = tmp_path / "deflated.pth"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    with pytest.raises(PthFormatError, match=r"record clean/\S+ is compressed \(zip method 8\)"):
        load_pth(path)


def test_truncated_and_damaged_archives(tmp_path, clean_file):
    src, _ = clean_file
    raw = src.read_bytes()
    path = tmp_path / "cut.pth"
    for keep in (len(raw) // 2, len(raw) - 1, 100):
        path.write_bytes(raw[:keep])
        with pytest.raises(PthFormatError,
                           match=rf"truncated or damaged zip archive \({keep} bytes\)"):
            load_pth(path)
    # the end record survives but the central directory it points to is damaged
    path.write_bytes(raw.replace(b"PK\x01\x02", b"PK\x01\x00", 1))
    with pytest.raises(PthFormatError,
                       match=rf"damaged zip archive \({len(raw)} bytes\): BadZipFile"):
        load_pth(path)
    path.write_bytes(b"")
    with pytest.raises(PthFormatError, match=r"empty file \(0 bytes\)"):
        load_pth(path)
