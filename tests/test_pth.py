"""Tests for allspark_jax.pth (torch-free .pth reading/writing)."""

import struct
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from allspark_jax.pth import PthFormatError, load_pth, save_pth

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
