"""Hugging Face transformers checkpoints: parity with transformers' SegFormer, strictness, export.

The data (tests/data/hf_mit_tiny, tests/data/hf_segformer_tiny) was written by
tests/data/record_transformers.py with torch and transformers: small random models of the real
architecture saved with `save_pretrained`, and their outputs on fixed inputs (NCHW).
"""
import dataclasses
import json
import os
import re
import shutil
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.numpy

from allspark_jax import errors
from allspark_jax import method as method_lib
from allspark_jax.weights import huggingface, loader
from allspark_jax.weights.pth_writer import save_pth
from allspark_jax.models.mit import MixVisionTransformer
from allspark_jax.models.segmentor import AllSparkSegmentor, ModelConfig
from reference_model import DATA, assert_trees_equal, nhwc, rel_err, shapes

SEG_DIR = os.path.join(DATA, "hf_segformer_tiny")
MIT_DIR = os.path.join(DATA, "hf_mit_tiny")
CASES = ("square", "rect")  # (2, 65, 65) and (1, 65, 97) inputs
RTOL = 2e-6  # per tensor ||out - ref|| / ||ref||


def copy_checkpoint(tmp_path, src, state=None, config=None, name="ckpt"):
    """A copy of checkpoint `src` in tmp_path/name, optionally with another state / config.json."""
    dst = tmp_path / name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("outputs.npz"))
    if state is not None:
        os.remove(dst / huggingface.WEIGHTS_NAME)
        safetensors.numpy.save_file(state, str(dst / huggingface.WEIGHTS_NAME),
                                    metadata={"format": "pt"})
    if config is not None:
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def file_state(directory):
    return safetensors.numpy.load_file(os.path.join(directory, huggingface.WEIGHTS_NAME))


def file_config(directory):
    with open(os.path.join(directory, "config.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def seg():
    """The SegFormer of hf_segformer_tiny, its variables, and a jitted forward returning the
    full-size logits, the head's stage-1 logits and the encoder's four maps."""
    model, variables, config = loader.load_segformer(SEG_DIR)

    @jax.jit
    def forward(v, x):
        out, state = model.apply(v, x, mode="eval",
                                 capture_intermediates=lambda m, _: m.name in ("head", "backbone"))
        inter = state["intermediates"]
        return out, inter["head"]["__call__"][0], inter["backbone"]["__call__"][0]

    return types.SimpleNamespace(model=model, variables=variables, config=config, forward=forward,
                                 ref=np.load(os.path.join(SEG_DIR, "outputs.npz")))


@pytest.fixture(scope="module")
def mit():
    """hf_mit_tiny's encoder as the MiT that transformers computes, and its recorded outputs."""
    _, config, _ = huggingface.read_checkpoint(MIT_DIR)
    return types.SimpleNamespace(backbone=huggingface.model_config_for(config).backbone,
                                 ref=np.load(os.path.join(MIT_DIR, "outputs.npz")))


def segformer_errors(seg, variables, case):
    ref = seg.ref
    out, logits, stages = seg.forward(variables, nhwc(ref[f"x_{case}"]))
    errs = {"upsampled": rel_err(out, nhwc(ref[f"{case}_upsampled"])),
            "logits": rel_err(logits, nhwc(ref[f"{case}_logits"]))}
    errs.update({f"stage{s + 1}": rel_err(stages[s], nhwc(ref[f"{case}_stage{s + 1}"]))
                 for s in range(4)})
    return errs


# ----------------------------------------------------------------------------- parity

@pytest.mark.parametrize("case", CASES)
def test_segformer_matches_transformers(seg, case):
    errs = segformer_errors(seg, seg.variables, case)
    assert max(errs.values()) <= RTOL, errs
    assert seg.forward(seg.variables, nhwc(seg.ref[f"x_{case}"]))[0].shape[1:3] == \
        seg.ref[f"x_{case}"].shape[2:]


@pytest.mark.parametrize("case", CASES)
def test_encoder_matches_transformers(seg, mit, case):
    # hf_mit_tiny has hf_segformer_tiny's architecture: its encoder goes into that SegFormer, whose
    # compiled forward (encoder maps captured) is reused.
    assert mit.backbone == seg.model.config.backbone
    variables = loader.load_pretrained_encoder(MIT_DIR, seg.variables)
    _, _, stages = seg.forward(variables, nhwc(mit.ref[f"x_{case}"]))
    errs = [rel_err(o, nhwc(mit.ref[f"{case}_stage{s + 1}"])) for s, o in enumerate(stages)]
    assert max(errs) <= RTOL, errs


def test_encoder_import_into_allspark_model(mit):
    """Into the encoder of an AllSpark model (release LayerNorm eps: not compared for an encoder);
    the rest of the variables is left as it was."""
    model = AllSparkSegmentor(ModelConfig(backbone=dataclasses.replace(mit.backbone, norm_eps=1e-6),
                                          num_classes=3, allspark_heads=2, decoder_dim=8,
                                          head_dropout=0.1, attn_drop=0.1, proj_drop=0.1,
                                          allspark=True))
    blank = jax.eval_shape(lambda: model.init(
        {"params": jax.random.key(0), "dropout": jax.random.key(1)}, jnp.zeros((2, 64, 64, 3)),
        mode="train", teacher_logits=jnp.zeros((1, 64, 64, 3))))
    loaded = loader.load_pretrained_encoder(MIT_DIR, blank, model_config=model.config)
    for part in ("head", "allspark"):  # the very same leaves
        assert all(a is b for a, b in zip(jax.tree.leaves(loaded["params"][part]),
                                          jax.tree.leaves(blank["params"][part])))
    assert all(a is b for a, b in zip(jax.tree.leaves(loaded["memory"]),
                                      jax.tree.leaves(blank["memory"])))
    state = file_state(MIT_DIR)
    np.testing.assert_array_equal(loaded["params"]["backbone"]["block2_1"]["attn"]["kv"]["kernel"],
                                  np.concatenate([state["encoder.block.1.1.attention.self.key.weight"],
                                                  state["encoder.block.1.1.attention.self.value.weight"]]).T)


def test_wrong_mappings_break_parity(seg, tmp_path):
    """The parity test can fail: swapping key and value, or reading linear_fuse's input blocks in
    transformers' module order ([c1, c2, c3, c4]) instead of the concatenation order."""
    state = file_state(SEG_DIR)
    swapped = dict(state)
    for k in state:
        if ".attention.self.key." in k:
            v = k.replace(".key.", ".value.")
            swapped[k], swapped[v] = state[v], state[k]
    fuse = "decode_head.linear_fuse.weight"
    reordered = dict(state)
    reordered[fuse] = np.concatenate(np.split(state[fuse], 4, axis=1)[::-1], axis=1)
    template = shapes(seg.variables)
    for name, bad in (("kv", swapped), ("fuse", reordered)):
        variables = loader.load_variables(copy_checkpoint(tmp_path, SEG_DIR, bad, name=name),
                                           template)
        errs = segformer_errors(seg, variables, "square")
        assert errs["logits"] > 1e-2, (name, errs)


# ----------------------------------------------------------------------------- export

# config.json fields transformers reads (all but its version and the dtype it was saved in).
def assert_config_round_trip(written, recorded, ignore=("transformers_version", "dtype")):
    for field in sorted(set(recorded) - set(ignore)):
        assert written.get(field) == recorded[field], field


def assert_states_equal(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_segformer_export_round_trip(seg, tmp_path):
    huggingface.save_checkpoint(seg.variables, seg.model.config, tmp_path,
                                id2label=seg.config["id2label"])
    assert_states_equal(file_state(tmp_path), file_state(SEG_DIR))
    assert_config_round_trip(file_config(tmp_path), file_config(SEG_DIR))
    with safetensors.safe_open(str(tmp_path / huggingface.WEIGHTS_NAME), "np") as f:
        assert f.metadata() == {"format": "pt"}  # transformers refuses files without it
    assert_trees_equal(loader.load_variables(tmp_path, shapes(seg.variables),
                                              model_config=seg.model.config), seg.variables)


def test_encoder_export_round_trip(mit, tmp_path):
    template = {"params": {"backbone": shapes(jax.eval_shape(lambda: MixVisionTransformer(
        mit.backbone).init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))["params"])}}
    variables = loader.load_pretrained_encoder(MIT_DIR, template)
    huggingface.save_checkpoint(variables, mit.backbone, tmp_path, encoder_only=True)
    assert_states_equal(file_state(tmp_path), file_state(MIT_DIR))
    assert_config_round_trip(file_config(tmp_path), file_config(MIT_DIR),
                             ignore=("transformers_version", "dtype", "id2label", "label2id",
                                     "decoder_hidden_size"))


def test_export_refuses_what_transformers_cannot_compute(seg, tmp_path):
    release_eps = dataclasses.replace(seg.model.config, backbone=dataclasses.replace(
        seg.model.config.backbone, norm_eps=1e-6))
    with pytest.raises(errors.WeightImportError, match=r"LayerNorm eps .*1e-05 in the file, 1e-06"):
        huggingface.save_checkpoint(seg.variables, release_eps, tmp_path)
    with_allspark = {"params": {**seg.variables["params"], "allspark": {}}}
    with pytest.raises(errors.WeightImportError, match="no AllSpark module"):
        huggingface.save_checkpoint(with_allspark, seg.model.config, tmp_path)


# ----------------------------------------------------------------------------- strictness

def test_every_bad_key_is_listed(seg, tmp_path):
    state = file_state(SEG_DIR)
    del state["segformer.encoder.block.1.1.attention.self.value.bias"]
    state["decode_head.extra.weight"] = np.zeros(3, np.float32)
    state["decode_head.linear_c.2.proj.weight"] = np.zeros((32, 41), np.float32)
    path = copy_checkpoint(tmp_path, SEG_DIR, state)
    with pytest.raises(errors.WeightImportError) as err:
        loader.load_variables(path, shapes(seg.variables))
    msg = str(err.value)
    assert str(path / "config.json") in msg
    assert "missing keys (1): segformer.encoder.block.1.1.attention.self.value.bias" in msg
    assert "unexpected keys (1): decode_head.extra.weight" in msg
    assert "decode_head.linear_c.2.proj.weight: file (32, 41), model expects (32, 40)" in msg


def test_architecture_mismatches_are_named(seg):
    source = os.path.join(SEG_DIR, "config.json")
    # From the variables alone: what their shapes show.
    other = AllSparkSegmentor(dataclasses.replace(seg.model.config, num_classes=6, decoder_dim=24))
    template = jax.eval_shape(lambda: other.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
    with pytest.raises(errors.WeightImportError) as err:
        loader.load_variables(SEG_DIR, template)
    msg = str(err.value)
    assert source in msg
    assert "decoder_hidden_size: 32 in the file, 24 in the model" in msg
    assert "num_labels: 5 in the file, 6 in the model" in msg
    # Heads and strides leave no trace in the variables: compared with a ModelConfig.
    mcfg = dataclasses.replace(seg.model.config, backbone=dataclasses.replace(
        seg.model.config.backbone, num_heads=(1, 2, 8, 8), patch_strides=(4, 2, 2, 1)))
    with pytest.raises(errors.WeightImportError) as err:
        loader.load_variables(SEG_DIR, shapes(seg.variables), model_config=mcfg)
    msg = str(err.value)
    assert "num_attention_heads: (1, 2, 5, 8) in the file, (1, 2, 8, 8) in the model" in msg
    assert "strides: (4, 2, 2, 2) in the file, (4, 2, 2, 1) in the model" in msg


def test_allspark_model_and_release_eps_are_rejected(seg):
    allspark = AllSparkSegmentor(dataclasses.replace(seg.model.config, allspark=True))
    template = jax.eval_shape(lambda: allspark.init(
        {"params": jax.random.key(0), "dropout": jax.random.key(1)}, jnp.zeros((2, 64, 64, 3)),
        mode="train", teacher_logits=jnp.zeros((1, 64, 64, 5))))
    with pytest.raises(errors.WeightImportError, match="AllSpark module: False in the file, True"):
        loader.load_variables(SEG_DIR, template)
    release_eps = dataclasses.replace(seg.model.config, backbone=dataclasses.replace(
        seg.model.config.backbone, norm_eps=1e-6))
    with pytest.raises(errors.WeightImportError, match="LayerNorm eps"):
        loader.load_variables(SEG_DIR, shapes(seg.variables), model_config=release_eps)


@pytest.mark.parametrize("field,value,expected", [
    ("hidden_act", "gelu_new", "hidden_act = 'gelu_new'"),
    ("hidden_dropout_prob", 0.1, "hidden_dropout_prob = 0.1"),
    ("model_type", "glpn", "model_type = 'glpn'"),
    ("depths", [1, 2, 1], "depths = [1, 2, 1]: expected 4 integers"),
])
def test_unsupported_config_is_rejected(seg, tmp_path, field, value, expected):
    path = copy_checkpoint(tmp_path, SEG_DIR, config={**file_config(SEG_DIR), field: value})
    with pytest.raises(errors.WeightImportError, match=re.escape(expected)):
        loader.load_variables(path, shapes(seg.variables))


def test_encoder_checkpoint_is_not_a_segmentation_model(seg):
    with pytest.raises(errors.WeightImportError, match="no decode_head.*load_pretrained_encoder"):
        loader.load_variables(MIT_DIR, shapes(seg.variables))


# ----------------------------------------------------------------------------- sources

def test_image_classification_checkpoint_and_file_paths(mit, tmp_path):
    """`segformer.`-prefixed encoder + ImageNet classifier (SegformerForImageClassification), given
    as a .safetensors file; the same weights as pytorch_model.bin, and as two indexed shards."""
    template = {"params": {"backbone": shapes(jax.eval_shape(lambda: MixVisionTransformer(
        mit.backbone).init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))["params"])}}
    expected = loader.load_pretrained_encoder(MIT_DIR, template)
    state = {f"segformer.{k}": v for k, v in file_state(MIT_DIR).items()}
    state["classifier.weight"] = np.ones((1000, 64), np.float32)
    state["classifier.bias"] = np.ones((1000,), np.float32)
    path = copy_checkpoint(tmp_path, MIT_DIR, state, name="cls")
    assert_trees_equal(loader.load_pretrained_encoder(path / huggingface.WEIGHTS_NAME, template),
                       expected)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(path / "config.json", bin_dir)
    save_pth(state, bin_dir / huggingface.PT_WEIGHTS_NAME)
    assert_trees_equal(loader.load_pretrained_encoder(bin_dir, template), expected)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(path / "config.json", sharded)
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        safetensors.numpy.save_file({k: state[k] for k in keys}, str(sharded / shard))
    (sharded / huggingface.WEIGHTS_INDEX_NAME).write_text(json.dumps(
        {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}))
    assert_trees_equal(loader.load_pretrained_encoder(sharded, template), expected)


def test_read_state_dict_gives_the_release_names():
    """A Hugging Face checkpoint read as a state dict (the dispatch: tests/test_weights_loader.py)
    comes back in the release's names, key/value fused, the BatchNorm counter int64."""
    state = loader.read_state_dict(SEG_DIR)
    assert state["backbone.block2.1.attn.kv.weight"].shape == (64, 32)
    assert state["decoder.decoder.linear_fuse.bn.num_batches_tracked"].dtype == np.int64


def test_hub_id_download(monkeypatch, seg):
    calls = []

    def snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return SEG_DIR

    monkeypatch.setitem(sys.modules, "huggingface_hub",
                        types.SimpleNamespace(snapshot_download=snapshot_download))
    loaded = loader.load_variables("nvidia/segformer-b0-finetuned-ade-512-512",
                                    shapes(seg.variables))
    assert_trees_equal(loaded, seg.variables)
    assert calls[0][0] == "nvidia/segformer-b0-finetuned-ade-512-512"
    assert "config.json" in calls[0][1]


def test_hub_id_offline_or_without_huggingface_hub(monkeypatch, seg):
    def offline(repo_id, allow_patterns):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setitem(sys.modules, "huggingface_hub",
                        types.SimpleNamespace(snapshot_download=offline))
    with pytest.raises(errors.WeightImportError,
                       match=r"nvidia/mit-b0: .*downloading it .* failed \(OSError: We couldn't"):
        loader.load_pretrained_encoder("nvidia/mit-b0", seg.variables)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(errors.WeightImportError, match="nvidia/mit-b0: .*needs huggingface_hub"):
        loader.load_pretrained_encoder("nvidia/mit-b0", seg.variables)


def test_model_pretrained_takes_a_hub_layout_encoder(mit):
    """`model.pretrained` (the run's encoder initialisation) takes a transformers checkpoint, as it
    takes mit_bX.pth (a .safetensors file or a hub id goes the same way: the loader's dispatch)."""
    import run_config
    from allspark_jax import optimizer, sharding, train
    from allspark_jax.models.segmentor import build_model
    b = mit.backbone
    config = run_config.tiny_config(**{
        "model.backbone": dict(embed_dims=b.embed_dims, depths=b.depths, num_heads=b.num_heads),
        "model.pretrained": MIT_DIR})
    model = build_model(config)
    tx, _ = optimizer.create_optimizer(config.optim, 10)
    state, _ = train.initial_state(config, model, tx, sharding.create_mesh(),
                                   method_lib.from_config(config))
    expected = loader.load_pretrained_encoder(MIT_DIR, {"params": {"backbone": shapes(
        state.params["backbone"])}})
    assert_trees_equal(jax.device_get(state.params["backbone"]), expected["params"]["backbone"])
