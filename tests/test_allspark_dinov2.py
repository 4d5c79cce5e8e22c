"""Parity of AllSpark on DINOv2 with the release's AllSpark module on UniMatch V2's DINOv2 + DPT.

tests/data/allspark_dinov2_tiny.npz was written by tests/data/record_allspark_dinov2.py (torch,
float32): the release's AllSpark module on the last of the four DINOv2 layers UniMatch V2's DPT head
reads, the release's evaluation (also checked through the size-bucketed evaluation program), its
training-mode forwards with and without the memory read, and three iterations of train_allspark.py
and of train_baseline_semi.py (the same model without AllSpark). The comparisons and tolerances are
`verify_reference`'s.
"""
import jax
import numpy as np
import pytest

from allspark_jax.errors import WeightImportError
from allspark_jax.models.segmentor import init_variables
from allspark_jax.tools import verify_reference
from allspark_jax.tools.verify_reference import FORWARD_RTOL, TRAINED_RTOL, Reference
from allspark_jax.weights import dinov2 as weights
from reference_model import ALLSPARK_DINOV2_NPZ, shapes

# eval logits and training-mode forwards (logits, memory, pointers): the brief's bound
FORWARD_BOUND = 2e-6
FORWARD_CASES = ("eval_single", "eval_single_bucketed", "train_forward_nomem",
                 "train_forward_mem", "train_step lrs", "train_step 0 losses", "semi_step lrs",
                 "semi_step 0 losses")
CASES = ("eval_single", "eval_single_bucketed", "train_forward_nomem", "train_forward_mem",
         "train_step lrs", "train_step 0 losses", "train_step state1", "train_step 1 losses",
         "train_step state2", "train_step 2 losses", "train_step state3",
         "semi_step lrs", "semi_step 0 losses", "semi_step 1 losses", "semi_step 2 losses",
         "semi_step state3")


@pytest.fixture(scope="module")
def recorded():
    with np.load(ALLSPARK_DINOV2_NPZ) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def results():
    lines = []
    return verify_reference.verify(ALLSPARK_DINOV2_NPZ, print_fn=lines.append), lines


def test_every_case_within_its_tolerance(results):
    results, lines = results
    print("\n".join(lines))
    assert [r.name for r in results] == list(CASES)
    bad = [r.line() for r in results if not r.ok]
    assert not bad, bad
    assert all(r.status == "ok" for r in results)
    for r in results:
        assert r.rtol == (FORWARD_RTOL if r.name in FORWARD_CASES else TRAINED_RTOL), r.name
        assert r.max_rel <= r.rtol, r.line()
        if r.name.startswith(("eval_single", "train_forward")):
            assert r.max_rel <= FORWARD_BOUND, r.line()
    memory = [r for r in results if r.name.startswith(("train_forward", "train_step state"))]
    assert all("memory rows written" in r.note and "DIFFER" not in r.note for r in memory)
    losses = [r for r in results if r.name.endswith("losses")]
    assert len(losses) == 6 and all("agree on 100.0000%" in r.note for r in losses)


def test_memory_read_is_what_tells_the_forwards_apart(tmp_path, recorded, capsys):
    """The forward with the memory read, checked as the one without, fails: the file tells them
    apart (their logits differ by far more than the tolerance)."""
    data = {k: v for k, v in recorded.items()
            if k == "meta_json" or k.startswith(("state0/", "inputs/"))}
    data.update({"train_forward_nomem/" + k[len("train_forward_mem/"):]: v
                 for k, v in recorded.items() if k.startswith("train_forward_mem/")})
    path = tmp_path / "swapped.npz"
    np.savez(path, **data)
    assert verify_reference.main([str(path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL train_forward_nomem" in out and "0 cases ok, 1 failed" in out


@pytest.fixture(scope="module")
def ref():
    return Reference(ALLSPARK_DINOV2_NPZ)


def test_state_dict_round_trip(ref, recorded):
    """state0 -> variables -> state dict gives every key back, bit for bit, with its dtype (the
    write pointers int64), and the variables have the model's own tree and shapes."""
    state0 = ref.prefixed("state0/")
    x = ref.x_l
    template = jax.eval_shape(lambda: init_variables(ref.model, jax.random.key(0), x.shape[1:3],
                                                     x.shape[0]))
    assert shapes(ref.variables) == template
    assert set(ref.variables["params"]) == {"backbone", "allspark", "head"}
    back = weights.segmentor_to_state_dict(ref.variables)
    assert sorted(back) == sorted(state0)
    for k, v in state0.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k


def test_state_dict_import_is_strict(ref):
    state0 = ref.prefixed("state0/")
    template = shapes(ref.variables)

    def error(state):
        with pytest.raises(WeightImportError) as e:
            weights.segmentor_from_state_dict(state, template, source="file.pth")
        return str(e.value)

    extra = error({**state0, "allspark.attn.extra": np.zeros(3, np.float32)})
    assert "file.pth does not fit" in extra and "unexpected keys (1): allspark.attn.extra" in extra
    missing = error({k: v for k, v in state0.items() if k != "allspark.attn.q_u.weight"})
    assert "missing keys (1): allspark.attn.q_u.weight" in missing
    wrong = error({**state0, "allspark.attn.kv_queue": state0["allspark.attn.kv_queue"][:, :, :4]})
    assert "allspark.attn.kv_queue: file (3, 8, 4), model expects (3, 8, 9)" in wrong
    head = error({k: v for k, v in state0.items() if k != "head.scratch.layer1_rn.weight"})
    assert "missing keys (1): head.scratch.layer1_rn.weight" in head
    # A DPT model's file (no allspark.*) for the AllSpark model: the method that fits is named.
    dpt = error({k: v for k, v in state0.items() if not k.startswith("allspark.")})
    assert "missing keys (18)" in dpt and "use config.method='semi' or 'supervised'" in dpt
    # module. (DistributedDataParallel) is dropped
    loaded = weights.segmentor_from_state_dict({"module." + k: v for k, v in state0.items()},
                                               template)
    assert jax.tree.all(jax.tree.map(np.array_equal, loaded, jax.tree.map(np.asarray,
                                                                          ref.variables)))
