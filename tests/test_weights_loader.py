"""The weights loader: which source a weight spec names, that each kind goes to its reader, and a
clear error naming any spec that is no weight source."""
import os
import shutil
import sys
import types

import jax
import numpy as np
import pytest

from allspark_jax import checkpoints, errors
from allspark_jax.weights import huggingface, loader, release, release_files
from reference_model import (BASELINES_NPZ, DATA, MIT_PTH, OFFICIAL_PTH, assert_trees_equal,
                             reference)

SEG_DIR = os.path.join(DATA, "hf_segformer_tiny")
MIT_DIR = os.path.join(DATA, "hf_mit_tiny")
HUB_ID = "nvidia/segformer-b0-finetuned-ade-512-512"


def shapes(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def serve_hub(monkeypatch, directory):
    """huggingface_hub whose snapshot_download serves `directory`; the calls it got."""
    calls = []

    def snapshot_download(repo_id, allow_patterns):
        calls.append(repo_id)
        return directory

    monkeypatch.setitem(sys.modules, "huggingface_hub",
                        types.SimpleNamespace(snapshot_download=snapshot_download))
    return calls


@pytest.fixture
def fake_hub(monkeypatch):
    """huggingface_hub whose snapshot_download serves SEG_DIR; the calls it got."""
    return serve_hub(monkeypatch, SEG_DIR)


@pytest.fixture(scope="module")
def release_files_of_every_kind(tmp_path_factory):
    """The tiny reference model as an official .pth, a .pt and an .npz state dict; its encoder as
    mit_bX.pth-style .pth, .pt and .npz files."""
    folder = tmp_path_factory.mktemp("release")
    ref = reference()
    paths = {"pth": str(folder / "latest.pth"), "pt": str(folder / "latest.pt"),
             "npz": str(folder / "weights.npz")}
    release_files.save_official_checkpoint(ref.variables, paths["pth"])
    shutil.copy(paths["pth"], paths["pt"])
    np.savez(paths["npz"], **release.to_state_dict(ref.variables))
    for suffix in ("pth", "pt", "npz"):
        paths[f"encoder.{suffix}"] = str(folder / f"encoder.{suffix}")
        release_files.save_pretrained_encoder(ref.variables, paths[f"encoder.{suffix}"])
    return paths


def test_each_kind_of_source(release_files_of_every_kind, monkeypatch):
    files = release_files_of_every_kind
    cases = {
        SEG_DIR: loader.HUGGINGFACE,  # a directory with config.json and model.safetensors
        os.path.join(MIT_DIR, huggingface.WEIGHTS_NAME): loader.HUGGINGFACE,
        files["pth"]: loader.PTH, files["pt"]: loader.PTH, MIT_PTH: loader.PTH,
        files["encoder.pt"]: loader.PTH, files["npz"]: loader.NPZ, files["encoder.npz"]: loader.NPZ,
        "nvidia/mit-b0": loader.HUB, HUB_ID: loader.HUB,
    }
    for spec, kind in cases.items():
        source = loader.source_of(spec)
        assert (source.kind, source.spec) == (kind, spec), spec
        assert loader.source_of(source) is source
        assert os.fspath(source) == str(source) == spec
    assert set(cases.values()) == set(loader.KINDS)  # every kind is covered here
    # Results name a release file by its absolute path, anything else as given.
    monkeypatch.chdir(os.path.dirname(files["pth"]))
    assert loader.source_of("latest.pth").name == files["pth"]
    assert loader.source_of(SEG_DIR).name == SEG_DIR


@pytest.mark.parametrize("name", ["missing.pth", "missing.pt", "missing.npz",
                                  "missing.safetensors"])
def test_a_missing_weight_file_is_named(tmp_path, name):
    path = str(tmp_path / name)
    with pytest.raises(FileNotFoundError, match=name):
        loader.source_of(path)
    with pytest.raises(FileNotFoundError, match=name):
        loader.load_variables(path, {})


@pytest.mark.parametrize("spec,why", [
    ("bestest", "no such file or directory, and not a hub id 'org/name'"),
    ("org/config.json", "no such file or directory, and not a hub id 'org/name'"),
    ("{tmp}", "a directory without config.json and model weights"),
    ("{tmp}/weights.bin", "a file whose name ends in none of .safetensors, .npz, .pth, .pt"),
])
def test_an_unknown_spec_is_a_clear_error_naming_it(tmp_path, spec, why):
    spec = spec.format(tmp=tmp_path)
    if spec.endswith(".bin"):
        (tmp_path / "weights.bin").write_bytes(b"\0" * 8)
    expected = f"{spec}: not a weight source ({why}); expected {loader.SOURCES}"
    with pytest.raises(errors.WeightImportError) as err:
        loader.source_of(spec)
    assert str(err.value) == expected
    for load in (lambda: loader.read_state_dict(spec), lambda: loader.load_variables(spec, {}),
                 lambda: loader.load_pretrained_encoder(spec, {}),
                 lambda: loader.load_segformer(spec)):
        with pytest.raises(errors.WeightImportError) as err:
            load()
        assert str(err.value) == expected
    # A checkpoint spec falls back on the loader for anything but its own specs.
    with pytest.raises(errors.CheckpointError) as err:
        checkpoints.parse_spec(spec)
    assert str(err.value) == (f"--checkpoint={spec!r}: expected a step number, 'latest', 'best', "
                              f"or a weight source: {loader.SOURCES}")


def test_release_kinds_go_to_the_release_readers(release_files_of_every_kind):
    ref = reference()
    template = shapes(ref.variables)
    blank = jax.tree.map(np.zeros_like, ref.variables)
    for kind in ("pth", "pt", "npz"):
        path = release_files_of_every_kind[kind]
        state = loader.read_state_dict(path)
        # an official checkpoint gives its `model` entry, keys as DDP saved them
        assert {k.removeprefix("module.") for k in state} == set(ref.state0), kind
        assert_trees_equal(loader.load_variables(path, template), ref.variables)
        with pytest.raises(errors.WeightImportError,
                           match=f"{path}: .*, not a Hugging Face SegFormer checkpoint"):
            loader.load_segformer(path)
        encoder = loader.load_pretrained_encoder(release_files_of_every_kind[f"encoder.{kind}"],
                                                 blank)
        assert_trees_equal(encoder["params"]["backbone"], ref.variables["params"]["backbone"])
        assert_trees_equal(encoder["params"]["head"], blank["params"]["head"])


def test_huggingface_kinds_go_to_the_huggingface_readers(fake_hub):
    directory = loader.read_state_dict(SEG_DIR)
    model, variables, config = loader.load_segformer(SEG_DIR)
    for spec in (os.path.join(SEG_DIR, huggingface.WEIGHTS_NAME), HUB_ID):
        assert_trees_equal(loader.read_state_dict(spec), directory)
        assert_trees_equal(loader.load_variables(spec, shapes(variables)), variables)
        _, again, again_config = loader.load_segformer(spec)
        assert_trees_equal(again, variables)
        assert again_config == config
    assert fake_hub == [HUB_ID] * 3  # only the hub id was fetched
    assert set(directory) == set(release.to_state_dict(variables))  # the release's names


def test_load_network_takes_the_callers_model_or_the_checkpoints_own(tmp_path):
    from allspark_jax.tools.verify_reference import Reference
    baseline = Reference(BASELINES_NPZ)  # no AllSpark: no memory, any crop fits
    path = tmp_path / "latest.pth"
    release_files.save_official_checkpoint(baseline.variables, path)
    network = loader.load_network(str(path), baseline.model, crop_size=64)
    assert network.model is baseline.model and network.labels is None
    assert_trees_equal(network.variables, baseline.variables)
    network = loader.load_network(SEG_DIR, baseline.model, crop_size=64)
    assert network.model is not baseline.model and not network.model.config.allspark
    assert network.labels == ("background", "road", "person", "car", "sky")
    assert_trees_equal(network.variables, loader.load_segformer(SEG_DIR)[1])


def test_official_checkpoint_spec_is_a_weight_source():
    parsed = checkpoints.parse_spec(f"  {OFFICIAL_PTH} ")
    assert parsed == loader.source_of(OFFICIAL_PTH) and parsed.kind == loader.PTH
