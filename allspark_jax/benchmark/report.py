"""The benchmark's results as text tables (console) and Markdown rows (BENCHMARKS.md)."""
from __future__ import annotations

import json
import os


def _fmt_bytes(b) -> str:
    return "-" if b is None else f"{b / 2 ** 30:.2f} GiB"


def format_report(r: dict) -> str:
    """The results as text tables."""
    lines = [f"backend {r['backend']} ({r['device_kind']}) x {r['devices']} devices, "
             f"model {r['backbone']} {r['dtype']} remat={r['remat']}, crop {r['crop']}, "
             f"global batch {r['batch']} labeled + {r['batch']} unlabeled"]
    if "matmul" in r:
        m = r["matmul"]
        lines.append(f"matmul peak: {m['n']}^3 {m['dtype']}: {m['seconds'] * 1e3:.1f} ms, "
                     f"{m['peak_tflops_per_s']:.3f} TFLOP/s")
    rows = [(k, r[k]) for k in ("train", "infer") if k in r]
    if rows:
        lines.append(f"{'':6} {'median s':>9} {'img/s':>8} {'compile s':>9} {'TFLOP/step':>10} "
                     f"{'TFLOP/s':>8} {'util':>6} {'XLA mem':>10} {'dev peak':>10} {'host RSS':>10}")
        for k, v in rows:
            util = f"{100 * v['utilisation']:.1f}%" if "utilisation" in v else "-"
            lines.append(
                f"{k:6} {v['seconds']:9.3f} {v['images_per_s']:8.2f} {v['compile_s']:9.1f} "
                f"{v['flops'] * r['devices'] / 1e12:10.3f} {v['tflops_per_s']:8.3f} {util:>6} "
                f"{_fmt_bytes(v.get('xla_memory_bytes')):>10} "
                f"{_fmt_bytes(v.get('device_peak_bytes')):>10} "
                f"{_fmt_bytes(v.get('host_peak_rss_bytes')):>10}")
    if "profile" in r:
        p = r["profile"]
        lines.append(f"profile: {p['op_seconds_per_step']:.3f} op-seconds per step "
                     f"({p['ops_traced']} ops)")
        for group in ("phase", "module", "kind"):
            parts = ", ".join(f"{k} {100 * v / p['op_seconds_per_step']:.1f}%"
                              for k, v in list(p[group].items())[:12])
            lines.append(f"  by {group}: {parts}")
        lines.append("  top (phase | module | kind):")
        for k, v in list(p["phase_module_kind"].items())[:10]:
            lines.append(f"    {100 * v / p['op_seconds_per_step']:5.1f}%  {k}")
    if "pipeline" in r:
        p = r["pipeline"]
        lines.append(f"pipeline: {p['pipeline_examples_per_s']:.2f} examples/s; the step consumes "
                     f"{p['step_examples_per_s']:.2f} (ratio {p['pipeline_over_step']:.2f}); step fed "
                     f"by the pipeline {p['fed_step_seconds']:.3f} s vs {p['resident_step_seconds']:.3f}"
                     f" s on a resident batch (x{p['fed_slowdown']:.2f})")
    for key in ("eval", "predict"):
        if key in r:
            e = r[key]
            ways = [w for w in ("per_size", "bucketed") if w in e]
            lines.append(f"{key}: {e['num_images']} images in {e['num_sizes']} sizes: " + "; ".join(
                f"{w} {e[w]['seconds']:.1f} s ({e[w]['images_per_s']:.2f} img/s"
                + (f", {e[w]['programs']} programs" if "programs" in e[w] else "") + ")"
                for w in ways) + (f"; bucketed {e['speedup']:.1f}x faster" if "speedup" in e else ""))
            if "memory" in e.get("bucketed", {}):
                m = e["bucketed"]["memory"]
                lines.append(f"  bucket {m['bucket'][0]}x{m['bucket'][1]}, {m['batch_per_device']} "
                             f"images per device: XLA memory {_fmt_bytes(m['xla_memory_bytes'])}, "
                             f"host peak RSS {_fmt_bytes(m['host_peak_rss_bytes'])}")
    if "scaling" in r:
        lines.append(f"scaling (per-device batch {r['per_device_batch']}):")
        lines.append(f"  {'devices':>7} {'batch':>6} {'median s':>9} {'img/s':>8} {'efficiency':>10}")
        for row in r["scaling"]:
            lines.append(f"  {row['devices']:7d} {row['global_batch']:6d} {row['seconds']:9.3f} "
                         f"{row['images_per_s']:8.2f} {100 * row['efficiency']:9.1f}%")
    return "\n".join(lines)


def markdown_table(paths: list[str]) -> str:
    """One Markdown row per results JSON (train and infer figures), for BENCHMARKS.md."""
    head = ("| run | model | crop | dtype | remat | batch | train s/step | train img/s | compile s | "
            "TFLOP/step | util | XLA mem | host RSS | infer s | infer img/s | infer util |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for path in paths:
        with open(path) as f:
            r = json.load(f)
        t, i = r.get("train"), r.get("infer")
        if t is None:
            continue
        pct = lambda v: f"{100 * v['utilisation']:.1f}%" if v and "utilisation" in v else "-"  # noqa: E731
        gib = lambda b: f"{b / 2 ** 30:.2f} GiB" if b else "-"  # noqa: E731
        name = os.path.splitext(os.path.basename(path))[0]
        rows.append(
            f"| {name} | {r['backbone']} | {r['crop']} | {r['dtype']} | {r['remat']} | "
            f"{r['batch']}+{r['batch']} | {t['seconds']:.2f} | {t['images_per_s']:.3f} | "
            f"{t['compile_s']:.1f} | {t['flops'] * r['devices'] / 1e12:.3f} | {pct(t)} | "
            f"{gib(t.get('xla_memory_bytes'))} | {gib(t.get('host_peak_rss_bytes'))} | "
            + (f"{i['seconds']:.2f} | {i['images_per_s']:.2f} | {pct(i)} |" if i else "- | - | - |"))
    return "\n".join(rows)
