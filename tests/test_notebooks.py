"""colabs/*.ipynb run top to bottom (nbclient, CPU, synthetic demo data), and allspark_jax.inspection.

The notebooks read one environment variable in their first cell, ALLSPARK_NOTEBOOK_WORKDIR (where
the synthetic data, the demo run and its checkpoint go: a tmp dir here); they load the shipped
configs by name (`allspark_jax.notebook.setup`). They run in one workdir in the order data -> predictions -> internals, so
the internals notebook uses the checkpoint the predictions notebook trained (as it would on a
user's machine); each notebook also runs on its own. The kernel is 'python3' started with this
interpreter (jupyter_client swaps a kernel spec's 'python' for sys.executable), so ipykernel must be
installed in the environment that runs pytest (the `[test]` extra does).
"""
import os
import time

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(REPO, "colabs")
NOTEBOOKS = ("data.ipynb", "predictions.ipynb", "allspark_internals.ipynb")
CELL_TIMEOUT_S = 600
MIN_FIGURES = {"data.ipynb": 3, "predictions.ipynb": 3, "allspark_internals.ipynb": 6}


# ------------------------------------------------------------------------------ allspark_jax.inspection


@pytest.fixture(scope="module")
def tiny_model():
    from allspark_jax.models.mit import MiTConfig
    from allspark_jax.models.segmentor import AllSparkSegmentor, ModelConfig, init_variables
    mit = MiTConfig(embed_dims=(8, 8, 8, 8), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    model = AllSparkSegmentor(ModelConfig(backbone=mit, num_classes=3, allspark_heads=2,
                                          decoder_dim=8, head_dropout=0.1, attn_drop=0.1,
                                          proj_drop=0.1, allspark=True))
    variables = jax.jit(lambda r: init_variables(model, r, 64, batch_size=2))(jax.random.key(0))
    return model, variables


@pytest.mark.parametrize("use_memory", [False, True])
def test_allspark_internals(tiny_model, use_memory):
    from allspark_jax import inspection
    model, variables = tiny_model
    x = np.random.default_rng(0).normal(size=(4, 64, 64, 3)).astype(np.float32)
    out = inspection.allspark_internals(model, variables, x[:2], x[2:], use_memory=use_memory)
    b, c, heads, k = 2, 8, 2, 3
    n = 4  # 64 / 32 = 2 x 2 stage-4 tokens
    assert out["grid"] == (2, 2)
    assert out["logits"].shape == (2 * b, 64, 64, k)
    assert out["teacher_logits"].shape == (b, 64, 64, k)
    assert out["channel_class"].shape == (b, c) and out["channel_class"].dtype == np.int32
    # the grouping is the argmax of the cosine similarities returned beside it
    sim = out["channel_class_similarity"]
    assert sim.shape == (b, k, c) and np.all(np.abs(sim) <= 1 + 1e-6)
    np.testing.assert_array_equal(sim.argmax(1), out["channel_class"])
    assert out["channels_per_class"].shape == (b, k)
    np.testing.assert_array_equal(out["channels_per_class"].sum(1), c)
    assert out["attn_u"].shape == (b, heads, c, c)
    m = k if use_memory else b
    assert out["attn_l2u"].shape == (1, b, heads * c, m * heads * c)
    np.testing.assert_allclose(out["attn_u"].sum(-1), 1, atol=1e-5)
    np.testing.assert_allclose(out["attn_l2u"].sum(-1), 1, atol=1e-5)
    assert out["memory_before"]["kv_queue"].shape == (k, c, n)
    # the memory write is the module's own: pointers advance by the channels grouped per class
    change = inspection.memory_change(out["memory_before"], out["memory_after"])
    np.testing.assert_array_equal(change["ptr_advance"], out["channels_per_class"].sum(0) % c)
    np.testing.assert_array_equal(change["written_per_class"],
                                  np.minimum(out["channels_per_class"].sum(0), c))
    # the variables passed in are not modified
    np.testing.assert_array_equal(inspection.memory_of(variables)["queue_ptr"], 0)
    summ = inspection.memory_summary(out["memory_after"])
    assert summ["row_norm"].shape == (k, c) and summ["class_similarity"].shape == (k, k)


def test_teacher_outputs_match_pseudo_labels(tiny_model):
    from allspark_jax import inspection
    model, variables = tiny_model
    x = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
    logits, pseudo = inspection.teacher_outputs(model, variables, x)
    assert logits.shape == (2, 64, 64, 3) and pseudo.shape == (2, 64, 64)
    np.testing.assert_array_equal(np.asarray(pseudo), np.argmax(np.asarray(logits), -1))


def test_counting_helpers():
    from allspark_jax import inspection
    from allspark_jax.evaluation import metrics
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, size=(3, 10, 12))
    target[:, 0] = 255
    pred = rng.integers(0, 4, size=(3, 10, 12))
    conf = metrics.confusion_matrix(pred, target, 4)
    inter, union, area = metrics.intersection_and_union(pred, target, 4)
    np.testing.assert_array_equal(np.diag(conf), inter)
    np.testing.assert_array_equal(conf.sum(1), area)
    np.testing.assert_array_equal(conf.sum(1) + conf.sum(0) - np.diag(conf), union)
    counts = inspection.class_pixel_counts(target, 4)
    np.testing.assert_array_equal(counts["pixels"], area)
    assert counts["ignored"] == 3 * 12 and counts["other"] == 0
    assert counts["images"].tolist() == [3, 3, 3, 3]
    # a list of maps of different sizes counts the same as the whole
    listed = inspection.class_pixel_counts([target[0], target[1:]], 4)
    np.testing.assert_array_equal(listed["pixels"], counts["pixels"])


def test_display_helpers():
    from allspark_jax import inspection
    from allspark_jax.commands import predict
    rgb = np.random.default_rng(0).integers(0, 256, size=(5, 6, 3)).astype(np.uint8)
    normed = predict.normalize(rgb)
    np.testing.assert_array_equal(inspection.denormalize(normed), rgb)
    col = inspection.colorize(np.array([[0, 1], [255, 2]]))
    assert col.shape == (2, 2, 3) and col.dtype == np.uint8
    assert col[0, 0].tolist() == [0, 0, 0] and col[0, 1].tolist() == [128, 0, 0]


# ----------------------------------------------------------------------------------------- notebooks


def test_notebooks_are_committed_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    for name in NOTEBOOKS:
        nb = nbformat.read(os.path.join(COLABS, name), as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{name}: clear the outputs"


@pytest.fixture(scope="module")
def notebook_workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("notebooks"))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, notebook_workdir, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("ALLSPARK_NOTEBOOK_WORKDIR", notebook_workdir)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # ipykernel's inline backend: Agg -> PNG outputs
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    nb = nbformat.read(os.path.join(COLABS, name), as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": COLABS}})
    t0 = time.time()
    client.execute()
    print(f"{name}: {time.time() - t0:.0f} s")
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    figures = sum("image/png" in o.get("data", {}) for o in outputs)
    assert figures >= MIN_FIGURES[name], f"{name} drew {figures} figures"
