"""docs/results.md and its plots, rendered from the experiment's results.json alone.

`render(results)` fills `results_template.md` (the prose) with the tables that the small
functions below draw; `plot_data_efficiency` and `plot_retention` draw the two PNGs. Everything is
read from the results dict (its `modes` and `columns` name the rows and columns), so a report can
be redrawn from a results.json without rerunning anything.
"""

from __future__ import annotations

import math
import os
import string

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_template.md")


def pct(x) -> str:
  return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def table(header: list[str], align: list[str], rows: list[list[str]]) -> str:
  """A markdown table; `align` per column: "l" or "r"."""
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
  return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _columns(r: dict) -> tuple[list[str], list[str]]:
  """The headline and the extra (italic) score columns some main row has."""
  names = [n for n in r["columns"] if any(n in e["scores"] for e in r["main"])]
  extras = [n for n in r["extra_columns"] if any(n in e.get("extra", {}) for e in r["main"])]
  return names, extras


def _cells(r: dict, e: dict) -> list[str]:
  names, extras = _columns(r)
  return [pct(e["scores"].get(n)) for n in names] + [pct(e.get("extra", {}).get(n)) for n in extras]


def _score_header(r: dict) -> list[str]:
  names, extras = _columns(r)
  return names + [f"*{n}*" for n in extras]


def compute_line(r: dict) -> str:
  c = r["compute"]
  data = f"data {c['data']:.1f}, " if c.get("data") is not None else ""
  reused = ", reusing cached steps." if r["wall_minutes"] < 0.9 * c["total"] else "."
  note = f" {r['note']}" if r.get("note") else ""
  return (f"{c['total']:.1f} min, the sum of every step's measured wall time ({data}pretraining {c['pretrain']:.1f}, "
          f"alignment {c['align']:.1f}, evaluation {c['eval']:.1f}, speed table {c['speed']:.1f} min; steps run one "
          f"after another in one process); this invocation took {r['wall_minutes']:.1f} min{reused}{note}")


def held_out(tower: dict) -> str:
  h = tower["held_out"]
  return (f"{pct(h['object_token_colour'])}% / {pct(h['object_token_shape'])}% of object tokens' colour / shape, "
          f"{pct(h['colour_counts'])}% / {pct(h['shape_counts'])}% of per-colour / per-shape counts right")


def main_table(r: dict) -> str:
  order = list(r["modes"])
  rows = [[r["modes"][e["mode"]], str(e["size"])] + _cells(r, e) + [
      f"**{pct(e['mean'])}**", f"{e['trainable'][0]:,} / {e['trainable'][1]:,}", f"{e['flops'] / 1e6:.1f}",
      f"{e['train_seconds']:.0f}"] for e in sorted(r["main"], key=lambda e: (order.index(e["mode"]), e["size"]))]
  header = ["mode", "samples"] + _score_header(r) + ["mean", "trainable params (stage 1 / 2)",
                                                     "prefill MFLOP/sample", "train s"]
  return table(header, ["l"] + ["r"] * (len(header) - 1), rows)


def spread_table(r: dict) -> str:
  rows = []
  for mode, label in r["modes"].items():
    by_seed = {e["seed"]: e["mean"] for e in r["main"] + r["spread"]
               if e["mode"] == mode and e["size"] == r["spread_size"]}
    vals = [by_seed.get(s) for s in r["seeds"]]
    spread = max(vals) - min(vals) if all(v is not None for v in vals) else None
    rows.append([label] + [pct(v) for v in vals] + [pct(spread)])
  header = ["mode"] + [f"seed {s}" for s in r["seeds"]] + ["spread"]
  return table(header, ["l"] + ["r"] * (len(header) - 1), rows)


def retention_table(r: dict) -> str:
  rows = [[str(e["size"]), e["variant"]] + _cells(r, e) + [pct(e["mean"]), pct(e["kept"]), pct(e["flops_saved"])]
          for e in r["retention"]]
  header = ["samples", "variant"] + _score_header(r) + ["mean", "kept", "FLOPs saved"]
  return table(header, ["r", "l"] + ["r"] * (len(header) - 2), rows)


def speed_section(r: dict) -> str:
  if not r["speed"]:
    return ""
  rows = []
  for e in r["speed"]:
    ref = next(x for x in r["speed"] if x["shape"] == e["shape"] and x["v"] == e["v"] and x["mode"] == "llava")
    rows.append([e["shape"], str(e["image_size"]), str(e["v"]), r["modes"][e["mode"]], f"{e['seconds'] * 1e3:.1f}",
                 f"{e['flops'] / 1e9:.1f}", f"{e['seconds'] / ref['seconds']:.2f}", f"{e['flops'] / ref['flops']:.2f}"])
  header = ["shape", "px", "V", "mode", "prefill ms", "GFLOP", "time vs LLaVA", "FLOPs vs LLaVA"]
  parts = ["## Speed: prefill at 336 / 448 / 672 px",
           f"Time to first token (tower + projector + LLM prefill + first token, median of {r['speed_repeats']}) and "
           f"analytic FLOPs, one image and {r['speed_text']} prompt tokens, one random parameter set per shape. "
           "Flamingo: a cross block every 4 layers, 64-latent 6-layer resampler (configs/flamingo_7b.py).",
           table(header, ["l", "r", "r", "l", "r", "r", "r", "r"], rows)]
  if not r["gpu_rows"]:
    parts.append("The full-size LLaVA-1.5-7B bf16 rows need a GPU: rerun with `--preset llava-1.5-7b` there "
                 "(this machine has none).")
  return "\n\n".join(parts) + "\n"


def render(r: dict) -> str:
  """The whole of results.md."""
  with open(TEMPLATE) as f:
    template = string.Template(f.read())
  llm, tower, recipe, shapes = r["parts"]["llm"], r["parts"]["tower"], r["recipe"], r["shapes"]
  text = template.substitute(
      scale=r["scale"], command=r["command"], machine=r["machine"], compute=compute_line(r),
      vision=shapes["vision"], llm=shapes["llm"], tokens=shapes["tokens"], latents=shapes["latents"],
      image_size=shapes["image_size"], sizes=", ".join(map(str, r["sizes"])), val=r["val"],
      llm_what=llm["what"], llm_records=llm["records"], llm_steps=llm["steps"], tower_what=tower["what"],
      tower_records=tower["records"], tower_steps=tower["steps"], held_out=held_out(tower),
      stage1_epochs=recipe["stage1_epochs"], stage1_lr=recipe["stage1_lr"], stage2_epochs=recipe["stage2_epochs"],
      stage2_lr=recipe["stage2_lr"], batch=recipe["batch"], prior=pct(r["prior"]), text_len=r["text_len"],
      main_table=main_table(r), spread_size=r["spread_size"], seeds=", ".join(map(str, r["seeds"])),
      spread_table=spread_table(r), retention_table=retention_table(r), schedule_size=r["schedule_size"],
      speed_section=speed_section(r))
  return text.rstrip("\n") + "\n"


def write(out: str, r: dict):
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(render(r))


# ------------------------------------------------------------------------------------ plots


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def plot_data_efficiency(r: dict, path: str):
  """Score vs training-set size (log scale), one panel per headline column and the mean."""
  plt = _pyplot()
  names, _ = _columns(r)
  sizes = r["sizes"]
  fig, axes = plt.subplots(1, len(names) + 1, figsize=(3.2 * (len(names) + 1), 3.2), sharex=True)
  for ax, name in zip(axes, names + ["mean"]):
    for mode, label in r["modes"].items():
      pts = sorted((e["size"], e["mean"] if name == "mean" else e["scores"].get(name, float("nan")))
                   for e in r["main"] if e["mode"] == mode and e["seed"] == 0)
      ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-", label=label)
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.minorticks_off()
    ax.set_title(name, fontsize=10)
    ax.set_xlabel("training samples")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("score (%)")
  axes[-1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_retention(points: list[dict], path: str):
  """EE-MLLM-F along the schedule: mean score kept vs prefill FLOPs saved, with and without the FFN."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for ffn, marker in ((True, "o-"), (False, "s--")):
    pts = sorted((p["flops_saved"], p["kept"], p["n"]) for p in points if p["visual_ffn"] == ffn)
    ax.plot([100 * p[0] for p in pts], [100 * p[1] for p in pts], marker,
            label=f"composite layers {'with' if ffn else 'without'} visual FFN")
    for x, y, n in pts:
      ax.annotate(f"n={n}", (100 * x, 100 * y), fontsize=7, xytext=(3, 3), textcoords="offset points")
  ax.axhline(100, color="gray", lw=0.8)
  ax.set_xlabel("prefill FLOPs saved vs LLaVA (%)")
  ax.set_ylabel("mean score kept vs LLaVA (%)")
  ax.set_title("EE-MLLM-F on the LLaVA model: layers [n, L) composite", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  """Redraws results.md and the plots from a results.json: `python benchmarks/results_report.py
  docs/results.json [OUT_DIR]` (OUT_DIR: the JSON's directory)."""
  import json  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  import data_efficiency_settings as settings  # pylint: disable=g-import-not-at-top
  argv = sys.argv[1:] if argv is None else argv
  if not argv:
    raise SystemExit(main.__doc__)
  with open(argv[0]) as f:
    r = json.load(f)
  # results.json files written before these keys existed name the settings' rows and columns
  r.setdefault("modes", settings.MODE_LABELS)
  r.setdefault("columns", [b[0] for b in settings.BENCHMARKS])
  r.setdefault("extra_columns", [c[0] for c in settings.EXTRA_METRICS])
  out = argv[1] if len(argv) > 1 else os.path.dirname(os.path.abspath(argv[0]))
  write(out, r)
  plot_data_efficiency(r, os.path.join(out, "data_efficiency.png"))
  if r["schedule"]:
    plot_retention(r["schedule"], os.path.join(out, "ee_mllm_f_retention.png"))
  print(f"wrote {os.path.join(out, 'results.md')}")


if __name__ == "__main__":
  main()
