"""The run's directory: where everything a run writes lives, local or remote.

Layout (`--workdir DIR`):
  config.json                the run's config
  eval_results.json          evaluations during training, by step
  eval_<checkpoint>.json     `--mode eval` results
  checkpoints/, checkpoints_best/   orbax checkpoints, a `<step>/` each (`allspark_jax.checkpoints`)
  checkpoints*/<step>.unreadable[.N]  a damaged checkpoint set aside once an older one restored
  events.out.tfevents.*      TensorBoard scalars (clu / tf.summary)
  main.INFO                  `main.py`'s log lines of the latest run (absl's link to its log file)
  synthetic_data/            the synthetic dataset, for data.name='synthetic' without a root
  jax_cache/                 the persistent compilation cache (config.compilation_cache)
  predictions/               `--mode predict` outputs by default
Paths go through `etils.epath`, so a `gs://` (or any fsspec / tf.io.gfile) workdir works for the
files written here; orbax and tf.summary handle such paths themselves.
"""
from __future__ import annotations

import json
import os
from typing import Any

from etils import epath

from allspark_jax.data import datasets

CONFIG_JSON = "config.json"
EVAL_HISTORY_JSON = "eval_results.json"
PREDICTIONS_DIR = "predictions"
LATEST_DIR = "checkpoints"
BEST_DIR = "checkpoints_best"
SYNTHETIC_DIR = "synthetic_data"  # when data.name == 'synthetic' and no data.root
COMPILATION_CACHE_DIR = "jax_cache"  # with config.compilation_cache
LOG_NAME = "main"  # main.py's absl log: main.INFO


def resolve(workdir: str | os.PathLike) -> epath.Path:
    """The workdir as an absolute epath (local paths made absolute: orbax needs them so)."""
    return epath.Path(datasets.absolute_path(workdir))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes JSON atomically: a temporary file renamed over the target (callers pick the process)."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    tmp.replace(path)


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    """The JSON at `path`, or `default` when there is no such file."""
    path = epath.Path(path)
    if not path.exists():
        return default
    return json.loads(path.read_text())
