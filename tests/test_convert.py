"""Weight import/export: official checkpoints, SegFormer encoders, plain state dicts, round trips."""
import jax
import numpy as np
import pytest

from allspark_jax import errors
from allspark_jax.weights import loader, release, release_files
from allspark_jax.weights.pth_reader import load_pth
from allspark_jax.weights.pth_writer import save_pth
from reference_model import BASELINES_NPZ, MIT_PTH, OFFICIAL_PTH, assert_trees_equal, reference


@pytest.fixture(scope="module")
def ref():
    return reference()


def template(ref):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), ref.variables)


def test_official_checkpoint_equals_reference_state(ref):
    assert_trees_equal(loader.load_variables(OFFICIAL_PTH, template(ref)), ref.variables)


def test_segformer_encoder_import(ref):
    blank = jax.tree.map(np.zeros_like, ref.variables)
    loaded = loader.load_pretrained_encoder(MIT_PTH, blank)
    assert_trees_equal(loaded["params"]["backbone"], ref.variables["params"]["backbone"])
    # Only the encoder is replaced.
    assert_trees_equal(loaded["params"]["head"], blank["params"]["head"])
    assert "head.weight" in load_pth(MIT_PTH)  # present in the file, ignored by the import


@pytest.mark.parametrize("suffix", [".npz", ".pth"])
def test_pretrained_encoder_export_round_trip(ref, tmp_path, suffix):
    """save_pretrained_encoder writes the encoder alone, with mit_bX.pth's names."""
    path = tmp_path / f"encoder{suffix}"
    release_files.save_pretrained_encoder(ref.variables, path)
    written = set(loader.read_state_dict(path))
    assert written == {k for k in load_pth(MIT_PTH) if not k.startswith("head.")}
    blank = jax.tree.map(np.zeros_like, ref.variables)
    loaded = loader.load_pretrained_encoder(path, blank)
    assert_trees_equal(loaded["params"]["backbone"], ref.variables["params"]["backbone"])
    assert_trees_equal(loaded["params"]["head"], blank["params"]["head"])


def test_state_dict_round_trip_is_exact(ref):
    state = release.to_state_dict(ref.variables)
    assert set(state) == set(ref.state0)
    for k, v in ref.state0.items():
        assert state[k].dtype == v.dtype, k
        np.testing.assert_array_equal(state[k], v, err_msg=k)


def test_official_checkpoint_export_round_trip(ref, tmp_path):
    path = tmp_path / "latest.pth"
    release_files.save_official_checkpoint(ref.variables, path, epoch=3)
    raw = load_pth(path)
    assert raw["epoch"] == 3 and all(k.startswith("module.") for k in raw["model"])
    assert_trees_equal(loader.load_variables(path, template(ref)), ref.variables)


def test_npz_state_dict(ref, tmp_path):
    path = tmp_path / "weights.npz"
    np.savez(path, **ref.state0)
    assert_trees_equal(loader.load_variables(path, template(ref)), ref.variables)


def test_mismatches_list_every_key(ref):
    state = dict(ref.state0)
    del state["backbone.norm1.weight"]
    state["decoder.extra.weight"] = np.zeros(3, np.float32)
    state["backbone.norm2.bias"] = np.zeros(7, np.float32)
    with pytest.raises(errors.WeightImportError) as err:
        release.from_state_dict(state, template(ref), source="my.pth")
    msg = str(err.value)
    assert "my.pth" in msg
    assert "missing keys (1): backbone.norm1.weight" in msg
    assert "unexpected keys (1): decoder.extra.weight" in msg
    assert "backbone.norm2.bias: file (7,)" in msg


def test_published_checkpoint_layout_is_named(ref, tmp_path):
    """The release's published checkpoints come from another version of its AllSpark module (keys
    `decoder.allspark.embeddings.*`, `decoder.allspark.encoder.layer.N.*`, which the released code
    does not define): the import names every such key and every AllSpark key of the released code
    the file lacks."""
    ours = sorted(k for k in ref.state0 if k.startswith("decoder.allspark."))
    state = {k: v for k, v in ref.state0.items() if not k.startswith("decoder.allspark.")}
    published = ["decoder.allspark.embeddings.patch_embeddings.weight",
                 "decoder.allspark.embeddings.position_embeddings",
                 "decoder.allspark.encoder.layer.0.attention_norm.weight",
                 "decoder.allspark.encoder.layer.0.attn.query_u.weight",
                 "decoder.allspark.encoder.layer.1.ffn.fc1.weight",
                 "decoder.allspark.encoder.encoder_norm.weight"]
    state.update({k: np.zeros((4,), np.float32) for k in published})
    path = tmp_path / "best.pth"
    save_pth({"model": {f"module.{k}": v for k, v in state.items()}}, path)
    with pytest.raises(errors.WeightImportError) as err:
        loader.load_variables(path, template(ref))
    msg = str(err.value)
    assert str(path) in msg
    assert f"missing keys ({len(ours)}): " in msg and f"unexpected keys ({len(published)}): " in msg
    for key in ours + published:
        assert key in msg, key
    assert "decoder.decoder" not in msg and "backbone." not in msg  # the rest fits


@pytest.fixture(scope="module")
def baseline():
    from allspark_jax.tools.verify_reference import Reference
    return Reference(BASELINES_NPZ)


def test_baseline_state_dict_round_trip_and_checkpoint(baseline, tmp_path):
    """A model without AllSpark (config.method 'semi' / 'supervised') writes and reads the release's
    semidec_base.SemiDecoder names exactly: no decoder.allspark.*, no memory."""
    assert not baseline.allspark and set(baseline.variables) == {"params", "batch_stats"}
    state = release.to_state_dict(baseline.variables)
    assert set(state) == set(baseline.state0)
    for k, v in baseline.state0.items():
        np.testing.assert_array_equal(state[k], v, err_msg=k)
    path = tmp_path / "latest.pth"
    release_files.save_official_checkpoint(baseline.variables, path)
    assert_trees_equal(loader.load_variables(path, template(baseline)), baseline.variables)


def test_method_hint_when_the_file_is_the_other_model(ref, baseline):
    with pytest.raises(errors.WeightImportError, match=r"use config.method='allspark'"):
        release.from_state_dict(ref.state0, template(baseline), source="allspark.pth")
    with pytest.raises(errors.WeightImportError, match=r"use config.method='semi' or 'supervised'"):
        release.from_state_dict(baseline.state0, template(ref), source="baseline.pth")


@pytest.mark.parametrize("name,content,message", [
    ("garbage.npz", b"not a zip", r"garbage.npz: not an .npz \(zip\) archive"),
    ("objects.npz", None, r"objects.npz: not a readable .npz state dict of numeric arrays"),
    ("garbage.pth", b"not a zip", r"garbage.pth: not a zip archive"),
])
def test_unreadable_weight_files_are_named(tmp_path, name, content, message):
    path = tmp_path / name
    if content is None:
        np.savez(path, a=np.array([{"x": 1}], dtype=object))
    else:
        path.write_bytes(content)
    with pytest.raises(errors.WeightImportError, match=message):
        loader.read_state_dict(path)
