"""`main.py --mode eval`: evaluates a checkpoint on the validation set and writes the results.

`run_evaluation(config, workdir, spec)` loads the checkpoint `spec` (a step, 'latest', 'best', a
weight file or a Hugging Face checkpoint: `checkpoints.load_inference_variables`), evaluates every
set of weights it holds (the EMA teacher's too), prints their tables and writes
<workdir>/eval_<tag>.json: {'checkpoint', 'step', 'results': {'student'[, 'ema']: result}}.
"""
from __future__ import annotations

import os

import jax

from allspark_jax import checkpoints
from allspark_jax import config as config_lib
from allspark_jax import runtime
from allspark_jax import workdir as workdir_lib
from allspark_jax.data import input_pipeline
from allspark_jax.evaluation import evaluator


def result_tag(spec) -> str:
    """The <tag> of eval_<tag>.json: the step, 'latest' or 'best', or a weight file's / Hugging
    Face checkpoint's last path component without its extension."""
    parsed = checkpoints.parse_spec(spec)
    if isinstance(parsed, int) or parsed in ("latest", "best"):
        return str(parsed)
    return os.path.splitext(os.path.basename(os.path.normpath(parsed)))[0]


def run_evaluation(config, workdir: str, spec) -> dict:
    """Evaluates checkpoint `spec`; writes <workdir>/eval_<tag>.json (process 0) and returns it."""
    runtime.setup_compilation_cache(config, workdir)
    opts = config_lib.data_options(config, workdir)
    input_pipeline.check_val_files(opts, progress=jax.process_index() == 0)
    variables, info = checkpoints.load_inference_variables(config, workdir, spec)
    predictor = evaluator.make_predictor(config, info["model"])
    results = {}
    for k, v in variables.items():
        results[k] = evaluator.evaluate_variables(config, opts, predictor, v, desc=f"eval ({k})")
        print(evaluator.format_iou_table(results[k], f"{k} weights, {info['checkpoint']} "
                                                     f"(step {info['step']}), mode "
                                                     f"{config.eval.mode}"), flush=True)
    out = {"checkpoint": info["checkpoint"], "step": info["step"], "results": results}
    if jax.process_index() == 0:
        workdir_lib.write_json(workdir_lib.resolve(workdir) / f"eval_{result_tag(spec)}.json", out)
    return out
