"""Where a compiled step's time goes: a profiler trace, each XLA op's time attributed to its phase
(teacher / forward / backward / update), module (encoder stage and sub-layer, AllSpark, head) and kind
(matmul, conv, elementwise, layout, reduce) through the op metadata of the compiled program."""
from __future__ import annotations

import collections
import gzip
import json
import os
import re
import tempfile

import jax


def hlo_op_names(hlo_text: str) -> dict[str, tuple[str, str]]:
    """Instruction name -> (opcode, JAX op_name metadata) for every instruction of an HLO module.

    A fusion is described by what it fuses: its opcode becomes `fusion:<root opcode>` of the
    called computation, and when XLA gave the fusion no metadata (as for some gradients it
    creates), it takes the first op_name found inside.
    """
    out, calls = {}, {}
    comp_root, comp_name, current = {}, {}, None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$", line)
        if header:
            current = header.group(1)
            continue
        m = re.match(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$", line)
        if not m:
            continue
        is_root, name, rest = m.groups()
        op = re.search(r"\s([a-z][\w\-]*)\(", " " + rest.split(", metadata=")[0])
        opcode = op.group(1) if op else "?"
        meta = re.search(r'op_name="([^"]*)"', rest)
        op_name = meta.group(1) if meta else ""
        out[name] = (opcode, op_name)
        called = re.search(r"calls=%?([\w.\-]+)", rest)
        if opcode == "fusion" and called:
            calls[name] = called.group(1)
        if current is not None:
            if is_root:
                comp_root[current] = opcode
            if op_name and current not in comp_name:
                comp_name[current] = op_name
    for name, comp in calls.items():
        opcode, op_name = out[name]
        out[name] = (f"fusion:{comp_root.get(comp, '?')}", op_name or comp_name.get(comp, ""))
    return out


def classify(op_name: str) -> tuple[str, str]:
    """(phase, module) of an op from its JAX name stack.

    phase: 'teacher' (the teacher pass, no autodiff), 'forward' / 'backward' (the student under
    jvp / its transpose), 'update' (loss, optimizer, EMA: ops outside the model).
    module: 'encoder s<i> attention|mlp|patch_embed|norm', 'allspark', 'head', 'other'.
    Ops that XLA created without any JAX name (it does so for some convolution weight gradients)
    are ('unattributed', 'unattributed').
    """
    if not op_name:
        return "unattributed", "unattributed"
    if "transpose(" in op_name:
        phase = "backward"
    elif "jvp(" in op_name:
        phase = "forward"
    elif "/backbone/" in op_name or "/allspark/" in op_name or "/head/" in op_name:
        phase = "teacher"
    else:
        phase = "update"
    m = re.search(r"/backbone/(?:block(\d)_\d+/(attn|mlp|norm\d)|patch_embed(\d)|norm(\d))", op_name)
    if m:
        if m.group(1):
            part = {"attn": "attention", "mlp": "mlp"}.get(m.group(2), "norm")
            module = f"encoder s{m.group(1)} {part}"
        elif m.group(3):
            module = f"encoder s{m.group(3)} patch_embed"
        else:
            module = f"encoder s{m.group(4)} norm"
    elif "/allspark/" in op_name:
        module = "allspark"
    elif "/head/" in op_name:
        module = "head"
    else:
        module = "other"
    return phase, module


def op_kind(opcode: str, name: str) -> str:
    """Coarse kind of a compiled op: matmul, conv, layout (transpose/copy), reduce, elementwise."""
    root = opcode.split(":")[-1]
    if root == "convolution":
        return "conv"
    if root == "dot" or any(w in name.lower() for w in ("gemm", "cublas", "matmul")):
        return "matmul"
    if root in ("transpose", "copy"):
        return "layout"
    if root in ("reduce", "reduce-window"):
        return "reduce"
    if opcode.startswith("fusion") or root in ("add", "multiply", "select", "exponential"):
        return "elementwise"
    return "other"


def _trace_events(logdir: str) -> list[dict]:
    paths = []
    for root, _, files in os.walk(logdir):
        paths += [os.path.join(root, f) for f in files if f.endswith("perfetto_trace.json.gz")]
    if not paths:
        raise RuntimeError(f"profile: no perfetto trace written under {logdir}")
    with gzip.open(sorted(paths)[-1]) as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def profile(step, batch, state, steps: int, logdir: str | None = None) -> tuple[dict, object]:
    """Op-level time of the compiled train step `step` over `steps` traced calls on `batch`.

    Sums each XLA op's traced duration (ops run in parallel on several threads, so the sum exceeds
    the wall time; shares are of the summed op time) and groups by phase, module and kind. The
    state is donated to the step: returns (results, the state after the calls).
    """
    names = hlo_op_names(step.as_text())
    with tempfile.TemporaryDirectory() as tmp:
        logdir = logdir or tmp
        with jax.profiler.trace(logdir, create_perfetto_trace=True):
            for _ in range(steps):
                state, metrics = step(state, batch)
                jax.block_until_ready(metrics)
        events = _trace_events(logdir)
    per_op = collections.Counter()
    for e in events:
        if e.get("ph") != "X":
            continue
        name = (e.get("args") or {}).get("hlo_op") or e.get("name")
        if name in names:
            per_op[name] += float(e.get("dur", 0.0)) * 1e-6 / steps
    total = sum(per_op.values())
    groups = {"phase": collections.Counter(), "module": collections.Counter(),
              "kind": collections.Counter(), "phase_module_kind": collections.Counter()}
    for name, sec in per_op.items():
        opcode, op_name = names[name]
        phase, module = classify(op_name)
        kind = op_kind(opcode, name)
        groups["phase"][phase] += sec
        groups["module"][module] += sec
        groups["kind"][kind] += sec
        groups["phase_module_kind"][f"{phase} | {module} | {kind}"] += sec
    top = [{"op": n, "opcode": names[n][0], "op_name": names[n][1], "seconds": s}
           for n, s in per_op.most_common(15)]
    return {"op_seconds_per_step": total, "ops_traced": len(per_op),
            **{k: dict(v.most_common()) for k, v in groups.items()}, "top_ops": top}, state
