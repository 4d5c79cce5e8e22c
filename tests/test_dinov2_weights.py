"""DINOv2-family weights through the loader and the commands: facebookresearch's and transformers'
encoders as `model.pretrained`, UniMatch V2's DPT checkpoints as `--checkpoint`, export back to
those layouts, and a clear error for each mismatch (family, architecture, AllSpark).

The files are the recorded ones of tests/data (record_dinov2.py): dpt_tiny.pth (UniMatch V2's DPT
state dict), dpt_tiny_eval.npz (the logits of UniMatch V2's own `evaluate` on two images from
dpt_tiny.pth), hf_dinov2_tiny/ (transformers' Dinov2Model). Tiny models only.
"""
import json
import os
import shutil
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from allspark_jax import checkpoints, errors
from allspark_jax.evaluation import evaluator
from allspark_jax.models.dinov2 import DINOv2, DINOv2Config
from allspark_jax.models.segmentor import build_model, init_variables
from allspark_jax.weights import dinov2, huggingface, loader, release_files
from allspark_jax.weights.pth_reader import load_pth
from allspark_jax.weights.pth_writer import save_pth
from test_weights_loader import serve_hub
from reference_model import DATA, MIT_PTH, OFFICIAL_PTH, assert_trees_equal, nhwc
from test_encoder import dinov2_config, set_backbone

DPT_PTH = os.path.join(DATA, "dpt_tiny.pth")
HF_DIR = os.path.join(DATA, "hf_dinov2_tiny")
MIT_DIR = os.path.join(DATA, "hf_mit_tiny")
EVAL = np.load(os.path.join(DATA, "dpt_tiny_eval.npz"))
EVAL_META = json.loads(str(EVAL["meta_json"]))
# dpt_tiny (record_dinov2.py's DPT_MODELS): its encoder and head as config.model fields.
DPT_BACKBONE = dict(embed_dim=32, depth=5, num_heads=2, pos_grid=37)
DPT_HEAD = dict(features=16, out_channels=(8, 12, 16, 24), layers=(0, 2, 3, 4))
# hf_dinov2_tiny (record_dinov2.py's HF_MODELS): 84 px / 14 = a 6 x 6 stored grid.
HF_ENCODER = DINOv2Config(embed_dim=32, depth=3, num_heads=2, pos_grid=6)


def dpt_config(method="semi", **backbone):
    """A run config whose model is dpt_tiny's (5 classes), with `backbone` fields changed (a
    shallower encoder reads its first 4 blocks)."""
    config = dinov2_config(method)
    set_backbone(config, {**DPT_BACKBONE, **backbone})
    for key, value in DPT_HEAD.items():
        config.model.dpt[key] = value
    if config.model.backbone.depth < 5:
        config.model.dpt.layers = (0, 1, 2, 3)
    config.data.crop_size = 28
    config.eval.mode = "original"
    config.eval.buckets = ((70, 98),)
    assert config.model.num_classes == EVAL_META["nclass"] == 5
    return config


def shapes(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def blank_variables(config):
    """Zero variables of `config`'s model (crop data.crop_size): what an import must replace."""
    model = build_model(config)
    return jax.tree.map(np.zeros_like, jax.device_get(
        init_variables(model, jax.random.key(0), int(config.data.crop_size)))), model


def dpt_state():
    return load_pth(DPT_PTH)


def encoder_state():
    """dpt_tiny.pth's encoder in facebookresearch's names (dinov2_vit*14_pretrain.pth's)."""
    return {k.removeprefix("backbone."): v for k, v in dpt_state().items()
            if k.startswith("backbone.")}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """dpt_tiny's encoder as a facebookresearch .pth (written by the project's pth writer), and
    as a transformers Dinov2Model directory; a UniMatch V2 trainer checkpoint of dpt_tiny."""
    folder = tmp_path_factory.mktemp("dinov2")
    paths = {"fb": str(folder / "dinov2_vitt14_pretrain.pth"), "hf": str(folder / "hf"),
             "trainer": str(folder / "latest.pth")}
    save_pth(encoder_state(), paths["fb"])
    encoder = DINOv2Config(**DPT_BACKBONE)
    params = dinov2.encoder_from_state_dict(
        encoder_state(), encoder_params_template(encoder), layout="dinov2")
    huggingface.save_checkpoint({"params": {"backbone": params}}, encoder, paths["hf"],
                                encoder_only=True)
    state = dpt_state()
    ema = {k: v * np.float32(0.5) for k, v in state.items()}
    save_pth({"model": {f"module.{k}": v for k, v in state.items()},
              "model_ema": {f"module.{k}": v for k, v in ema.items()},
              "optimizer": {"state": {}, "param_groups": []}, "epoch": 3, "previous_best": 0.5,
              "previous_best_ema": 0.5, "best_epoch": 3, "best_epoch_ema": 3}, paths["trainer"])
    return paths


def encoder_params_template(encoder: DINOv2Config):
    side = 2 * encoder.patch_size
    return jax.eval_shape(DINOv2(encoder).init, jax.random.key(0),
                          jnp.zeros((1, side, side, 3)))["params"]


def hf_variables():
    """Variables whose encoder is hf_dinov2_tiny's architecture (zeros), and a stand-in head."""
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                          encoder_params_template(HF_ENCODER))
    return {"params": {"backbone": params, "head": {"bias": np.ones(3, np.float32)}}}


# -- dispatch ------------------------------------------------------------------------------------


def test_layouts_are_decided_from_the_keys(files, tmp_path):
    """Each DINOv2 layout is recognised by its keys whatever the file is called, and the MiT
    ones are not taken for DINOv2."""
    state = dpt_state()
    assert dinov2.layout_of(state) == dinov2.UNIMATCH_V2
    assert dinov2.layout_of({f"module.{k}": v for k, v in state.items()}) == dinov2.UNIMATCH_V2
    assert dinov2.layout_of(encoder_state()) == "dinov2"
    assert dinov2.layout_of(safetensors.numpy.load_file(
        os.path.join(HF_DIR, huggingface.WEIGHTS_NAME))) == "transformers"
    assert dinov2.layout_of(load_pth(MIT_PTH)) is None
    assert dinov2.layout_of(loader.read_state_dict(OFFICIAL_PTH)) is None
    # The names of the files say nothing: an encoder named like a checkpoint is an encoder.
    odd = tmp_path / "best.pth"
    shutil.copy(files["fb"], odd)
    blank, _ = blank_variables(dpt_config())
    loaded = loader.load_pretrained_encoder(str(odd), blank)
    assert_trees_equal(loaded["params"]["backbone"], dinov2.encoder_from_state_dict(
        encoder_state(), blank["params"]["backbone"], layout="dinov2"))
    # Every kind of source reaches its reader (.npz, .pth, directory, .safetensors).
    npz = tmp_path / "encoder.npz"
    np.savez(npz, **encoder_state())
    for spec, kind in ((str(npz), loader.NPZ), (files["fb"], loader.PTH),
                       (files["hf"], loader.HUGGINGFACE),
                       (os.path.join(files["hf"], huggingface.WEIGHTS_NAME), loader.HUGGINGFACE)):
        assert loader.source_of(spec).kind == kind
        again = loader.load_pretrained_encoder(spec, blank)
        assert_trees_equal(again["params"]["backbone"], loaded["params"]["backbone"])
    # read_state_dict gives a Dinov2Model's state dict in its own (transformers') names.
    assert set(loader.read_state_dict(HF_DIR)) == set(safetensors.numpy.load_file(
        os.path.join(HF_DIR, huggingface.WEIGHTS_NAME)))


# -- model.pretrained ----------------------------------------------------------------------------


def initial_state(config):
    """The run's initial train state (`train.initial_state`, model.pretrained applied)."""
    from allspark_jax import method as method_lib
    from allspark_jax import optimizer, sharding, train
    tx, _ = optimizer.create_optimizer(config.optim, 10)
    state, _ = train.initial_state(config, build_model(config), tx, sharding.create_mesh(),
                                   method_lib.from_config(config))
    return state


def test_pretrained_from_a_facebookresearch_pth_through_training(files):
    """`model.pretrained` = a dinov2_vit*14_pretrain.pth: the run's initial encoder is the file's,
    exactly; the head keeps its initialisation (that of a run without model.pretrained)."""
    config = dpt_config()
    config.model.pretrained = files["fb"]
    state = initial_state(config)
    loaded = jax.device_get(state.params)
    theirs = dinov2.encoder_to_state_dict(loaded["backbone"], layout="dinov2")
    assert set(theirs) == set(encoder_state())
    for k, v in encoder_state().items():
        np.testing.assert_array_equal(theirs[k], v, err_msg=k)
    # The head is the model's initialisation from the run's seed (as train.initial_state draws it).
    init_rng = jax.random.split(jax.random.key(int(config.seed)))[0]
    fresh = init_variables(build_model(config), init_rng, int(config.data.crop_size))["params"]
    assert_trees_equal(loaded["head"], jax.device_get(fresh["head"]))
    assert not np.array_equal(fresh["backbone"]["cls_token"], loaded["backbone"]["cls_token"])


def test_pretrained_into_allspark_on_dinov2_keeps_allspark_and_memory(files):
    """Method 'allspark': only the encoder is replaced; AllSpark, the head and the Semantic
    Memory keep their values."""
    blank, model = blank_variables(dpt_config("allspark"))
    filled = jax.tree.map(lambda x: np.full_like(x, 3), blank)
    loaded = loader.load_pretrained_encoder(files["fb"], filled, model_config=model.config)
    for key in ("allspark", "head"):
        assert_trees_equal(loaded["params"][key], filled["params"][key])
    assert_trees_equal(loaded["memory"], filled["memory"])
    ours = dinov2.encoder_to_state_dict(loaded["params"]["backbone"], layout="dinov2")
    for k, v in encoder_state().items():
        np.testing.assert_array_equal(ours[k], v, err_msg=k)


def test_pretrained_from_a_huggingface_dinov2_dir_hub_id_and_safetensors(monkeypatch):
    """A transformers Dinov2Model (directory, .safetensors beside config.json, or a hub id through
    the hub download) gives the encoder params exactly equal to the file's; the rest is kept."""
    calls = serve_hub(monkeypatch, HF_DIR)
    file_state = safetensors.numpy.load_file(os.path.join(HF_DIR, huggingface.WEIGHTS_NAME))
    variables = hf_variables()
    for spec in (HF_DIR, os.path.join(HF_DIR, huggingface.WEIGHTS_NAME), "facebook/dinov2-small"):
        loaded = loader.load_pretrained_encoder(spec, variables, model_config=HF_ENCODER)
        ours = dinov2.encoder_to_state_dict(loaded["params"]["backbone"], layout="transformers")
        assert set(ours) == set(file_state), spec
        for k, v in file_state.items():
            np.testing.assert_array_equal(ours[k], v, err_msg=f"{spec}: {k}")
        assert_trees_equal(loaded["params"]["head"], variables["params"]["head"])
    assert calls == ["facebook/dinov2-small"]


def test_pretrained_from_a_huggingface_dir_through_training(files):
    """The run's initial encoder from a Dinov2Model directory (dpt_tiny's encoder exported in
    transformers' names) equals dpt_tiny's."""
    config = dpt_config()
    config.model.pretrained = files["hf"]
    state = initial_state(config)
    theirs = dinov2.encoder_to_state_dict(jax.device_get(state.params["backbone"]),
                                          layout="dinov2")
    for k, v in encoder_state().items():
        np.testing.assert_array_equal(theirs[k], v, err_msg=k)


def test_pretrained_from_transformers_keys_in_an_npz(tmp_path):
    """A Dinov2Model's state dict saved as .npz (no config.json: its shapes are checked) is the
    same encoder as its directory."""
    path = tmp_path / "dinov2_hf_keys.npz"
    np.savez(path, **safetensors.numpy.load_file(os.path.join(HF_DIR, huggingface.WEIGHTS_NAME)))
    expected = loader.load_pretrained_encoder(HF_DIR, hf_variables(), model_config=HF_ENCODER)
    assert_trees_equal(loader.load_pretrained_encoder(str(path), hf_variables(),
                                                      model_config=HF_ENCODER), expected)
    wide = DINOv2Config(embed_dim=48, depth=3, num_heads=2, pos_grid=6)
    with pytest.raises(errors.WeightImportError) as err:
        loader.load_pretrained_encoder(str(path), hf_variables(), model_config=wide)
    assert one_line(err) == (f"{path}: the DINOv2 encoder does not fit the model's: embed_dim 32 "
                             f"in the file, 48 in the model; ffn_hidden 128 in the file, 192 in "
                             f"the model")


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    def offline(repo_id, allow_patterns):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setitem(sys.modules, "huggingface_hub",
                        types.SimpleNamespace(snapshot_download=offline))
    with pytest.raises(errors.WeightImportError,
                       match=r"facebook/dinov2-small: .*downloading it .* failed \(OSError"):
        loader.load_pretrained_encoder("facebook/dinov2-small", hf_variables(),
                                       model_config=HF_ENCODER)


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_pretrained_architecture_mismatch_names_the_field(files):
    blank, model = blank_variables(dpt_config(depth=4))
    with pytest.raises(errors.WeightImportError) as err:
        loader.load_pretrained_encoder(files["fb"], blank, model_config=model.config)
    assert one_line(err) == (f"{files['fb']}: the DINOv2 encoder does not fit the model's: "
                             f"depth 5 in the file, 4 in the model")
    wide = DINOv2Config(embed_dim=48, depth=3, num_heads=2, pos_grid=6)
    with pytest.raises(errors.WeightImportError) as err:
        loader.load_pretrained_encoder(HF_DIR, hf_variables(), model_config=wide)
    assert one_line(err) == (f"{os.path.join(HF_DIR, 'config.json')}: the DINOv2 encoder does "
                             f"not fit the model's: embed_dim 32 in the file, 48 in the model")
    heads = DINOv2Config(embed_dim=32, depth=3, num_heads=4, pos_grid=6)
    with pytest.raises(errors.WeightImportError, match="num_heads 2 in the file, 4 in the model"):
        loader.load_pretrained_encoder(HF_DIR, hf_variables(), model_config=heads)
    # Without a model config the keys' shapes are checked, strictly.
    with pytest.raises(errors.WeightImportError,
                       match=r"does not fit the model:\n  missing keys \(14\): blocks\.5\."):
        loader.load_pretrained_encoder(files["fb"], blank_variables(dpt_config(depth=6))[0])


def test_pretrained_of_the_other_family_is_a_clear_error(files, tmp_path):
    dino, dino_model = blank_variables(dpt_config())
    for spec, holds in ((MIT_PTH, "a MiT model or encoder (the release's or SegFormer's names)"),
                        (MIT_DIR, "a transformers SegFormer checkpoint (a MiT model)")):
        with pytest.raises(errors.WeightImportError) as err:
            loader.load_pretrained_encoder(spec, dino, model_config=dino_model.config)
        assert f"holds {holds}; the model's encoder is DINOv2 (config.model.encoder=" \
               f"'dinov2'): expected a DINOv2 dinov2_vit*14_pretrain.pth or a Hugging Face " \
               f"Dinov2Model checkpoint" in one_line(err)
    from reference_model import reference
    mit = reference().variables
    for spec, holds in ((files["fb"], "a DINOv2 encoder (facebookresearch's"),
                        (HF_DIR, "a transformers Dinov2Model")):
        with pytest.raises(errors.WeightImportError) as err:
            loader.load_pretrained_encoder(spec, mit)
        assert f"holds {holds}" in one_line(err)
        assert "; the model's encoder is MiT (config.model.encoder='mit'): " in str(err.value)
    other = tmp_path / "other.pth"
    save_pth({"fc.weight": np.zeros((2, 2), np.float32)}, other)
    for load in (lambda: loader.load_pretrained_encoder(str(other), dino),
                 lambda: loader.load_variables(str(other), shapes(dino))):
        with pytest.raises(errors.WeightImportError) as err:
            load()
        assert one_line(err).startswith(f"{other}: holds neither DINOv2 nor MiT keys; the model's "
                                        f"encoder is DINOv2 (config.model.encoder='dinov2'): ")
    with pytest.raises(errors.WeightImportError) as err:
        loader.load_pretrained_encoder(DPT_PTH, dino)
    assert one_line(err) == (f"{DPT_PTH}: holds UniMatch V2's DPT model (a DINOv2 model), not an "
                             f"encoder; expected a DINOv2 dinov2_vit*14_pretrain.pth or a Hugging "
                             f"Face Dinov2Model checkpoint (a whole model is a --checkpoint)")


# -- --checkpoint --------------------------------------------------------------------------------


def test_a_unimatch_v2_pth_predicts_as_its_code_does():
    """dpt_tiny.pth as --checkpoint of a DINOv2 'semi' config, through the predictor that eval and
    predict build: the labels of the two images equal the argmax of the logits UniMatch V2's own
    `evaluate` computed, every pixel (there are no exact ties; the smallest top-2 margin of the
    recorded logits is printed)."""
    config = dpt_config()
    variables, info = checkpoints.load_inference_variables(config, None, DPT_PTH)
    assert set(variables) == {"student"} and info["checkpoint"] == os.path.abspath(DPT_PTH)
    predictor = evaluator.make_predictor(config, info["model"])
    images = [nhwc(EVAL[f"image{i}_x"])[0] for i in range(len(EVAL_META["sizes"]))]
    preds = predictor.predict(variables["student"], images)
    for i, pred in enumerate(preds):
        ref = nhwc(EVAL[f"image{i}_logits"])[0]
        top2 = np.sort(ref, axis=-1)[..., -2:]
        margin = float((top2[..., 1] - top2[..., 0]).min())
        print(f"image {i} {ref.shape[:2]}: smallest recorded top-2 margin {margin:.2e}")
        assert margin > 0  # no exact ties: every label is determined
        np.testing.assert_array_equal(np.asarray(pred), ref.argmax(-1))


def test_the_predict_command_with_a_unimatch_v2_pth(tmp_path):
    """`--mode predict --checkpoint dpt_tiny.pth` (run_predict): the masks it writes are the
    argmax of the model's own eval-mode logits for each image alone (unbucketed)."""
    from PIL import Image

    from allspark_jax.commands import predict
    config = dpt_config()
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate(((61, 75), (50, 88))):
        paths.append(str(tmp_path / f"image{i}.png"))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    records = predict.run_predict(config, None, DPT_PTH, paths, str(tmp_path / "out"),
                                  quiet=True)
    variables, info = checkpoints.load_inference_variables(config, None, DPT_PTH)
    for path, record in zip(paths, records):
        rgb = np.asarray(Image.open(path).convert("RGB"))
        logits = info["model"].apply(variables["student"], predict.normalize(rgb)[None],
                                     mode="eval")
        np.testing.assert_array_equal(np.asarray(Image.open(record["mask"])),
                                      np.asarray(logits[0]).argmax(-1))
        assert len(record["classes"]) > 1, record  # not a constant mask


def test_a_unimatch_v2_trainer_checkpoint_gives_model_and_model_ema(files):
    """UniMatch V2's latest.pth / best.pth (DDP `module.` keys, `model` and `model_ema`): the
    student is `model`, 'ema' is `model_ema` (eval evaluates both, predict the student)."""
    config = dpt_config()
    variables, info = checkpoints.load_inference_variables(config, None, files["trainer"])
    template = shapes(init_variables(info["model"], jax.random.key(0), 28))
    plain = loader.load_variables(DPT_PTH, template)
    assert_trees_equal(variables["student"], plain)
    assert_trees_equal(variables["ema"], jax.tree.map(lambda v: v * np.float32(0.5), plain))
    # load_variables gives the `model` entry.
    assert_trees_equal(loader.load_variables(files["trainer"], template), plain)


def test_checkpoint_mismatches_are_clear_errors(files, tmp_path):
    dino = dpt_config()
    with pytest.raises(errors.WeightImportError) as err:  # UniMatch V2 into an AllSpark model
        checkpoints.load_inference_variables(dpt_config("allspark"), None, DPT_PTH)
    assert str(err.value).startswith(f"{DPT_PTH} does not fit the model:\n  missing keys (18): "
                                     f"allspark.attn.k_l2u.weight")
    assert str(err.value).endswith("the file holds a model without AllSpark (UniMatch V2's DPT "
                                   "layout): use config.method='semi' or 'supervised'")
    allspark, _ = blank_variables(dpt_config("allspark"))  # AllSpark on DINOv2 into its baseline
    allspark_pth = tmp_path / "allspark_dinov2.pth"
    release_files.save_unimatch_checkpoint(allspark, allspark_pth)
    with pytest.raises(errors.WeightImportError) as err:
        checkpoints.load_inference_variables(dino, None, str(allspark_pth))
    assert "unexpected keys (18): allspark.attn.k_l2u.weight" in str(err.value)
    assert str(err.value).endswith("use config.method='allspark'"), str(err.value)
    with pytest.raises(errors.WeightImportError) as err:  # a MiT model into a DINOv2 config
        checkpoints.load_inference_variables(dino, None, OFFICIAL_PTH)
    assert one_line(err) == (f"{OFFICIAL_PTH}: holds a MiT model or encoder (the release's or "
                             f"SegFormer's names); the model's encoder is DINOv2 "
                             f"(config.model.encoder='dinov2'): expected UniMatch V2's DPT model "
                             f"(backbone.* + head.*)")
    with pytest.raises(errors.WeightImportError, match="holds a transformers SegFormer"):
        checkpoints.load_inference_variables(dino, None, os.path.join(DATA, "hf_segformer_tiny"))
    for spec in (files["fb"], HF_DIR):  # an encoder is no whole model
        with pytest.raises(errors.WeightImportError) as err:
            checkpoints.load_inference_variables(dino, None, spec)
        assert one_line(err).endswith("not a whole model; give it as config.model.pretrained (the "
                                      "encoder to start from)")
    import run_config
    mit = run_config.tiny_config()
    for spec in (DPT_PTH, HF_DIR):  # a DINOv2 file into a MiT config
        with pytest.raises(errors.WeightImportError) as err:
            checkpoints.load_inference_variables(mit, None, spec)
        assert "; the model's encoder is MiT (config.model.encoder='mit'): " in one_line(err)
    small = dpt_config(embed_dim=24, depth=4)
    small.model.num_classes = 3
    small.data.num_classes = 3
    with pytest.raises(errors.WeightImportError) as err:  # architecture: one line, each field
        checkpoints.load_inference_variables(small, None, DPT_PTH)
    assert one_line(err) == (f"{DPT_PTH}: the DINOv2 model does not fit the model's: embed_dim 32 "
                             f"in the file, 24 in the model; depth 5 in the file, 4 in the model; "
                             f"ffn_hidden 128 in the file, 96 in the model; num_classes 5 in the "
                             f"file, 3 in the model")


# -- export --------------------------------------------------------------------------------------


def test_unimatch_checkpoint_export_round_trip(tmp_path):
    """save_unimatch_checkpoint writes UniMatch V2's DPT state dict: dpt_tiny.pth's keys and values
    exactly, and it reloads to identical variables (.pth and .npz)."""
    config = dpt_config()
    variables, info = checkpoints.load_inference_variables(config, None, DPT_PTH)
    template = shapes(variables["student"])
    for name in ("dpt_tiny.pth", "dpt_tiny.npz"):
        path = tmp_path / name
        release_files.save_unimatch_checkpoint(variables["student"], path)
        written = loader.read_state_dict(path)
        assert set(written) == set(dpt_state())
        for k, v in dpt_state().items():
            np.testing.assert_array_equal(written[k], v, err_msg=k)
        assert_trees_equal(loader.load_variables(path, template), variables["student"])
    with pytest.raises(errors.WeightImportError, match="the AllSpark release has no DINOv2 models"):
        release_files.save_official_checkpoint(variables["student"], tmp_path / "latest.pth")
    from reference_model import reference
    with pytest.raises(errors.WeightImportError, match="these variables are a MiT model's"):
        release_files.save_unimatch_checkpoint(reference().variables, tmp_path / "x.pth")
    # AllSpark on DINOv2: UniMatch V2's keys plus the release module's (memory included).
    allspark, model = blank_variables(dpt_config("allspark"))
    release_files.save_unimatch_checkpoint(allspark, tmp_path / "y.pth")
    written = loader.read_state_dict(tmp_path / "y.pth")
    assert set(written) - set(dpt_state()) >= {"allspark.attn.kv_queue", "allspark.map_in.0.weight"}
    assert_trees_equal(loader.load_variables(tmp_path / "y.pth", shapes(allspark)),
                       {k: allspark[k] for k in ("params", "batch_stats", "memory")})


@pytest.mark.parametrize("suffix", [".pth", ".npz"])
def test_pretrained_encoder_export_round_trip(tmp_path, suffix):
    """save_pretrained_encoder of a DINOv2 model writes facebookresearch's names (dpt_tiny.pth's
    backbone.* without the prefix, values exact); it reloads as model.pretrained."""
    variables = loader.load_variables(DPT_PTH, shapes(blank_variables(dpt_config())[0]))
    path = tmp_path / f"dinov2_vitt14_pretrain{suffix}"
    release_files.save_pretrained_encoder(variables, path)
    written = loader.read_state_dict(path)
    assert set(written) == set(encoder_state())
    for k, v in encoder_state().items():
        np.testing.assert_array_equal(written[k], v, err_msg=k)
    blank, model = blank_variables(dpt_config())
    loaded = loader.load_pretrained_encoder(path, blank, model_config=model.config)
    assert_trees_equal(loaded["params"]["backbone"], variables["params"]["backbone"])
    assert_trees_equal(loaded["params"]["head"], blank["params"]["head"])


def test_huggingface_dinov2_export_round_trip(tmp_path):
    """huggingface.save_checkpoint(..., encoder_only=True) of a DINOv2 model writes a Dinov2Model
    directory: hf_dinov2_tiny's own weights written back are its file exactly, with its
    architecture in config.json; the export reloads to identical params."""
    loaded = loader.load_pretrained_encoder(HF_DIR, hf_variables(), model_config=HF_ENCODER)
    out = huggingface.save_checkpoint(loaded, HF_ENCODER, tmp_path / "hf", encoder_only=True)
    original = safetensors.numpy.load_file(os.path.join(HF_DIR, huggingface.WEIGHTS_NAME))
    written = safetensors.numpy.load_file(os.path.join(out, huggingface.WEIGHTS_NAME))
    assert set(written) == set(original)
    for k, v in original.items():
        np.testing.assert_array_equal(written[k], v, err_msg=k)
    with open(os.path.join(out, huggingface.CONFIG_NAME)) as f:
        config = json.load(f)
    with open(os.path.join(HF_DIR, huggingface.CONFIG_NAME)) as f:
        recorded = json.load(f)
    for field in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "mlp_ratio", "patch_size", "image_size", "use_swiglu_ffn", "qkv_bias",
                  "layer_norm_eps", "hidden_act"):
        assert config[field] == recorded[field], field
    again = loader.load_pretrained_encoder(out, hf_variables(), model_config=HF_ENCODER)
    assert_trees_equal(again, loaded)
    # A DINOv2 model through its ModelConfig; transformers has no whole DINOv2 segmentation model.
    blank, model = blank_variables(dpt_config())
    huggingface.save_checkpoint(blank, model.config, tmp_path / "dpt", encoder_only=True)
    with pytest.raises(errors.WeightImportError, match="transformers has no DINOv2 segmentation"):
        huggingface.save_checkpoint(blank, model.config, tmp_path / "whole")
    with pytest.raises(errors.WeightImportError, match="is not the DINOv2 encoder of model_config"):
        huggingface.save_checkpoint(blank, HF_ENCODER, tmp_path / "wrong", encoder_only=True)


def test_unimatch_trainer_checkpoint_export(tmp_path):
    """save_unimatch_checkpoint(ema=...) writes UniMatch V2's trainer `latest.pth` (model and
    model_ema, `module.` keys): --checkpoint reads them back as student and ema."""
    config = dpt_config()
    student = checkpoints.load_inference_variables(config, None, DPT_PTH)[0]["student"]
    teacher = jax.tree.map(lambda x: x * 0.5, student)
    path = tmp_path / "latest.pth"
    release_files.save_unimatch_checkpoint(student, path, ema=teacher, epoch=7,
                                           previous_best=61.5, previous_best_ema=62.0)
    saved = load_pth(path)
    assert {k: saved[k] for k in ("epoch", "previous_best", "previous_best_ema", "best_epoch",
                                  "best_epoch_ema")} == {
        "epoch": 7, "previous_best": 61.5, "previous_best_ema": 62.0, "best_epoch": 7,
        "best_epoch_ema": 7}
    assert set(saved["model"]) == set(saved["model_ema"]) == {f"module.{k}" for k in dpt_state()}
    loaded = checkpoints.load_inference_variables(config, None, path)[0]
    assert_trees_equal(loaded["student"], student)
    assert_trees_equal(loaded["ema"], teacher)
    with pytest.raises(errors.WeightImportError, match=r"x.npz: UniMatch V2's trainer checkpoint"):
        release_files.save_unimatch_checkpoint(student, tmp_path / "x.npz", ema=teacher)
    # AllSpark's teacher has no memory of its own: both entries carry the student's.
    allspark, _ = blank_variables(dpt_config("allspark"))
    release_files.save_unimatch_checkpoint(
        allspark, tmp_path / "a.pth", ema={k: allspark[k] for k in ("params", "batch_stats")})
    saved = load_pth(tmp_path / "a.pth")
    assert set(saved["model"]) == set(saved["model_ema"])
    np.testing.assert_array_equal(saved["model_ema"]["module.allspark.attn.kv_queue"],
                                  saved["model"]["module.allspark.attn.kv_queue"])
