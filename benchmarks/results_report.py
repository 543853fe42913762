"""docs/results.md and its plots, rendered from the experiment's results.json alone.

`evidence.analyse(results)` computes every number (intervals, the informative benchmarks, paired
differences, the claims' verdicts, EE-MLLM-F retention); `render(results, a)` fills
`results_template.md` with the tables the small functions below draw; `plot_data_efficiency`,
`plot_pareto` and `plot_retention` draw the PNGs; `write_all(out, results)` does all of it with one
analysis. Everything is read from the results dict (its `modes` and `columns` name the rows and
columns), so a report can be redrawn from a results.json without rerunning anything:
`python benchmarks/results_report.py docs/results.json [OUT_DIR]`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import string
import sys

import evidence as ev  # benchmarks run as scripts: this directory is on sys.path
import frontier

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_template.md")
DAGGER = "†"


def pct(x) -> str:
  return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def table(header: list[str], align: list[str], rows: list[list[str]]) -> str:
  """A markdown table; `align` per column: "l" or "r"."""
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
  return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def rtable(header: list[str], rows: list[list[str]], left: int = 1) -> str:
  """A table whose first `left` columns are left-aligned, the rest right-aligned."""
  return table(header, ["l"] * left + ["r"] * (len(header) - left), rows)


def pm(x, scale: float = 1.0) -> str:
  """"41.0 ± 5.2" (points), "–" for none."""
  return "–" if x is None else f"{scale * x.mean:.1f} ± {scale * x.half_width:.1f}"


def signed(x) -> str:
  """"+6.1 [2.3, 9.9]"."""
  return "–" if x is None else f"{x.mean:+.1f} [{x.low:.1f}, {x.high:.1f}]"


def half(h: float) -> str:
  return "–" if h is None or math.isnan(h) else f"{h:.1f}"


def _name(a: dict, c: str) -> str:
  return c if c in a["cols"] else c + DAGGER


def _cell_keys(r: dict, a: dict) -> list[tuple[str, int]]:
  return [(m, n) for m in r["modes"] for n in r["sizes"] if (m, n) in a["cells"]]


def compute_line(r: dict) -> str:
  c, n = r["compute"], r.get("workers", 1)
  data = f"data {c['data']:.1f}, " if c.get("data") is not None else ""
  if n > 1:  # the cells' steps overlapped: their sum says nothing about what was reused
    how, reused = (f"the seeds' cells ran in {n} worker processes side by side, each step timed while the others "
                   "ran"), "."
  else:
    how = "steps run one after another in one process"
    reused = ", reusing cached steps." if r["wall_minutes"] < 0.9 * c["total"] else "."
  note = f" {r['note']}" if r.get("note") else ""
  return (f"{c['total']:.1f} min, the sum of every step's measured wall time ({data}pretraining {c['pretrain']:.1f}, "
          f"alignment {c['align']:.1f}, evaluation {c['eval']:.1f}, speed table {c['speed']:.1f} min; {how}); "
          f"this invocation took {r['wall_minutes']:.1f} min{reused}{note}")


def letters_part(llm: dict) -> str:
  """The LLM's letter stage, where it ran: its steps and its held-out letter accuracy."""
  if "letters" not in llm:
    return ""
  x = llm["letters"]
  return (f", then {x['steps']} steps of the letter exercises alone: {pct(x['held_out_accuracy'])}% of held-out "
          "exercises answered with the right letter, against 25% by chance")


def held_out(tower: dict) -> str:
  h = tower["held_out"]
  glyph = f"{pct(h['glyph_token'])}% of glyph tokens' character, " if "glyph_token" in h else ""
  glyph += f"{pct(h['word_token'])}% of text tokens' word, " if "word_token" in h else ""
  return (f"{glyph}{pct(h['object_token_colour'])}% / {pct(h['object_token_shape'])}% of object tokens' colour / "
          f"shape, {pct(h['colour_counts'])}% / {pct(h['shape_counts'])}% of per-colour / per-shape counts right")


# ------------------------------------------------------------------------------------ tables


def informative_table(r: dict, a: dict) -> str:
  rows = []
  for t in a["informative"]:
    mode, size = t["best"]
    rows.append([t["column"], f"{t['prior']:.1f}", f"{r['modes'][mode]}, {size}", f"{t['mean']:.1f}",
                 f"{t['gap']:+.1f}", half(t["threshold"]), "yes" if t["ok"] else f"**no** {DAGGER}"])
  header = ["benchmark", "prior", "best cell (mode, samples)", "its mean", "gap", f"{a['sds']:g} SD", "informative"]
  return table(header, ["l", "r", "l", "r", "r", "r", "l"], rows)


def main_table(r: dict, a: dict) -> str:
  names = [c for c in r["columns"] if c in next(iter(a["cells"].values()))["columns"]]
  extras = [k for k in r.get("extra_columns", []) if any(k in x["extra"] for x in a["cells"].values())]
  rows = []
  for mode, size in _cell_keys(r, a):
    x = a["cells"][mode, size]
    rows.append([r["modes"][mode], str(size), str(x["seeds"])] + [pm(x["columns"][c]) for c in names]
                + [f"**{pm(x['headline'])}**"] + [pct(x["extra"].get(k)) for k in extras]
                + [f"{x['train_flops'] / 1e15:.3g}", f"{x['flops'] / 1e6:.1f}", f"{x['train_seconds']:.0f}",
                   f"{x['trainable'][0]:,} / {x['trainable'][1]:,}"])
  header = (["mode", "samples", "seeds"] + [_name(a, c) for c in names] + ["headline"] + [f"*{k}*" for k in extras]
            + ["train PFLOPs", "prefill MFLOPs/sample", "train s", "trainable params (stage 1 / 2)"])
  return rtable(header, rows, 2)


def sources_table(r: dict, a: dict) -> str:
  names = list(next(iter(a["cells"].values()))["columns"])
  rows = []
  for mode, size in _cell_keys(r, a):
    x = a["cells"][mode, size]
    h = x["headline"]
    rows.append([r["modes"][mode], str(size)] + [f"{half(x['columns'][c].seeds)} / {half(x['columns'][c].questions)}"
                                                 for c in names]
                + ["–" if h is None else f"{half(h.seeds)} / {half(h.questions)}"])
  return rtable(["mode", "samples"] + [_name(a, c) for c in names] + ["headline"], rows, 2)


def diff_table(r: dict, a: dict) -> str:
  if not a["cols"]:
    return "No informative benchmark: no headline to compare."
  rows = []
  for key in [n for n in r["sizes"] if n in a["diff"][ev.LLAVA]] + ["all"]:
    ll, fl = a["diff"][ev.LLAVA].get(key), a["diff"][ev.FLAMINGO].get(key)
    rows.append([f"**{key}**" if key == "all" else str(key), signed(ll and ll[0.95]), signed(ll and ll[0.90]),
                 ev.iv.equivalent(ll[0.90], margin=a["margin"]) if ll else "–", signed(fl and fl[0.95]),
                 ev.iv.superiority(fl[0.95]) if fl else "–"])
  header = ["samples", "EE − LLaVA (95%)", "EE − LLaVA (90%)", f"equivalent (±{a['margin']:g})",
            "EE − Flamingo (95%)", "EE better (superiority)"]
  return rtable(header, rows)


def uses_image_table(r: dict, a: dict) -> str:
  rows = [[str(n), signed(t["diff"]), half(t["threshold"]), "yes" if t["ok"] else "no"]
          for n, t in sorted(a["uses_image"].items())]
  return rtable(["samples", "LLaVA open: images − blank (95%)", f"{a['sds']:g} SD of the per-seed differences",
                 "uses the image"], rows)


def _retention_rows(points: list[dict], margin: float, first: str, image: dict) -> list[list[str]]:
  rows = []
  for p in points:
    lead = str(p["size"] if first == "size" else p["n"])
    llava = p.get("llava")
    if first == "size" and not image.get(p["size"], {}).get("ok"):
      lead += f" {DAGGER}"
    rows.append([lead + (" (LLaVA)" if llava else ""), "on" if p["visual_ffn"] else "off", pm(p["kept"], 100),
                 "0 (itself)" if llava else signed(p["diff"]), signed(p["diff90"]),
                 ev.iv.equivalent(p["diff90"], margin=margin) if p["diff90"] else "–", pct(p["flops_saved"])])
  return rows


def retention_tables(r: dict, a: dict) -> tuple[str, str]:
  header = ["samples", "visual FFN", "kept (%)", "EE-MLLM-F − LLaVA (95%)", "(90%)", f"equivalent (±{a['margin']:g})",
            "FLOPs saved (%)"]
  ret = a["retention"]
  zero = rtable(header, _retention_rows(ret["at_zero"], a["margin"], "size", a["uses_image"]), 2)
  sched = rtable(["n"] + header[1:], _retention_rows(ret["schedule"], a["margin"], "n", a["uses_image"]), 2)
  return zero, sched


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


def render(r: dict, a: dict | None = None) -> str:
  """The whole of results.md (`a`: `evidence.analyse(r)`, computed when not given)."""
  a = a if a is not None else ev.analyse(r)
  with open(TEMPLATE) as f:
    template = string.Template(f.read())
  llm, tower, recipe, shapes = r["parts"]["llm"], r["parts"]["tower"], r["recipe"], r["shapes"]
  uninformative = [t["column"] for t in a["informative"] if not t["ok"]]
  zero, sched = retention_tables(r, a)
  text = template.substitute(
      scale=r["scale"], command=r["command"], machine=r["machine"], compute=compute_line(r),
      claims="\n".join(ev.claim_lines(r, a)), n_seeds=len(r["seeds"]), seeds=", ".join(map(str, r["seeds"])),
      vision=shapes["vision"], llm=shapes["llm"], tokens=shapes["tokens"], latents=shapes["latents"],
      image_size=shapes["image_size"], sizes=", ".join(map(str, r["sizes"])), val=r["val"],
      llm_what=llm["what"], llm_records=llm["records"], llm_steps=llm["steps"], llm_letters=letters_part(llm),
      tower_what=tower["what"],
      tower_records=tower["records"], tower_steps=tower["steps"], held_out=held_out(tower),
      stage1_epochs=recipe["stage1_epochs"], stage1_lr=recipe["stage1_lr"], stage2_epochs=recipe["stage2_epochs"],
      stage2_lr=recipe["stage2_lr"], batch=recipe["batch"], text_len=r["text_len"], margin=f"{a['margin']:g}",
      sds=f"{a['sds']:g}", informative_cols=", ".join(a["cols"]) or "none",
      uninformative=(f"Uninformative ({DAGGER}), shown but in no headline: {', '.join(uninformative)}."
                     if uninformative else "Every benchmark is informative."),
      informative_table=informative_table(r, a), main_table=main_table(r, a), sources_table=sources_table(r, a),
      diff_table=diff_table(r, a), uses_image_table=uses_image_table(r, a), retention_zero=zero,
      retention_schedule=sched, schedule_size=r["schedule_size"],
      schedule_uses_image="uses" if a["uses_image"].get(r["schedule_size"], {}).get("ok") else "does not use",
      frontier_section=frontier.section(r, a["frontier"]) if "frontier" in a else "",
      speed_section=speed_section(r), DAGGER=DAGGER)
  return text.rstrip("\n") + "\n"


def write(out: str, r: dict, a: dict | None = None):
  with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
    f.write(render(r, a))


# ------------------------------------------------------------------------------------ plots


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _errorbar(ax, xs, ivs, label, fmt="o-"):
  pts = [(x, v) for x, v in zip(xs, ivs) if v is not None]
  if pts:
    ax.errorbar([p[0] for p in pts], [p[1].mean for p in pts], yerr=[p[1].half_width for p in pts], fmt=fmt,
                capsize=3, label=label)


def _save(fig, plt, path: str):
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_data_efficiency(r: dict, path: str, a: dict | None = None):
  """The headline and each informative benchmark vs training-set size (log scale), one series per
  mode, error bars = the 95% interval (seeds and questions)."""
  a = a if a is not None else ev.analyse(r)
  plt = _pyplot()
  panels = ["headline"] + a["cols"]
  fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), sharex=True, squeeze=False)
  for ax, name in zip(axes[0], panels):
    for mode, label in r["modes"].items():
      sizes = [n for n in r["sizes"] if (mode, n) in a["cells"]]
      cells = [a["cells"][mode, n] for n in sizes]
      _errorbar(ax, sizes, [c["headline"] if name == "headline" else c["columns"][name] for c in cells], label)
    ax.set_xscale("log")
    ax.set_xticks(r["sizes"], [str(s) for s in r["sizes"]])
    ax.minorticks_off()
    ax.set_title(name, fontsize=10)
    ax.set_xlabel("training samples")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("score (points)")
  axes[0][-1].legend(fontsize=8)
  _save(fig, plt, path)


def plot_pareto(r: dict, path: str, a: dict | None = None):
  """Headline vs training FLOPs per run (log x) and vs prefill FLOPs per sample: one series per mode,
  a point per size, error bars = the 95% interval."""
  a = a if a is not None else ev.analyse(r)
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for mode, label in r["modes"].items():
    sizes = [n for n in r["sizes"] if (mode, n) in a["cells"]]
    cells = [a["cells"][mode, n] for n in sizes]
    ivs = [c["headline"] for c in cells]
    for ax, xs, fmt in ((axes[0], [c["train_flops"] for c in cells], "o-"),
                        (axes[1], [c["flops"] / 1e6 for c in cells], "o")):
      _errorbar(ax, xs, ivs, label, fmt)
      for x, n, h in zip(xs, sizes, ivs):
        if h is not None:
          ax.annotate(str(n), (x, h.mean), fontsize=7, xytext=(4, -3), textcoords="offset points")
  axes[0].set_xscale("log")
  axes[0].set_xlabel("training FLOPs per run (both stages)")
  axes[1].set_xlabel("prefill MFLOPs per sample")
  for ax in axes:
    ax.set_ylabel("headline (points)")
    ax.grid(alpha=0.3)
  fig.suptitle(f"headline = mean of {', '.join(a['cols']) or 'no informative benchmark'}; labels: training samples",
               fontsize=9)
  axes[0].legend(fontsize=8)
  _save(fig, plt, path)


def plot_retention(r: dict, path: str, a: dict | None = None):
  """EE-MLLM-F along the schedule: share of the headline kept ± its interval vs prefill FLOPs saved,
  with and without the visual FFN."""
  a = a if a is not None else ev.analyse(r)
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for ffn, fmt in ((True, "o-"), (False, "s--")):
    pts = sorted((p for p in a["retention"]["schedule"] if p["visual_ffn"] == ffn and p["kept"] is not None),
                 key=lambda p: p["flops_saved"])
    kept = [_scaled(p["kept"], 100) for p in pts]
    _errorbar(ax, [100 * p["flops_saved"] for p in pts], kept,
              f"composite layers {'with' if ffn else 'without'} visual FFN", fmt)
    for p in pts:
      ax.annotate(f"n={p['n']}", (100 * p["flops_saved"], 100 * p["kept"].mean), fontsize=7, xytext=(3, 3),
                  textcoords="offset points")
  finish_kept_plot(fig, plt, ax, path, xlabel="prefill FLOPs saved vs LLaVA (%)", ylabel="headline kept vs LLaVA (%)",
                   title=f"EE-MLLM-F on the LLaVA models ({r['schedule_size']} samples): layers [n, L) composite")


def finish_kept_plot(fig, plt, ax, path: str, *, xlabel: str, ylabel: str, title: str, legend: int = 8):
  """The frame of a share-kept plot (the 100% line, labels, grid, legend), saved to `path`."""
  ax.axhline(100, color="gray", lw=0.8)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=legend)
  _save(fig, plt, path)


def _scaled(x, k: float):
  """An interval `x` in units k times larger (shares as percentages)."""
  return dataclasses.replace(x, mean=k * x.mean, low=k * x.low, high=k * x.high, seeds=k * x.seeds,
                             questions=k * x.questions)


def write_all(out: str, r: dict, *, samples: int = ev.iv.BOOTSTRAP_SAMPLES) -> dict:
  """results.md, data_efficiency.png, pareto.png, ee_mllm_f_retention.png and frontier.png (where the
  frontier ran) in `out`, from one analysis (returned)."""
  a = ev.analyse(r, samples=samples)
  a["frontier"] = frontier.analyse(r, a, samples=samples)
  write(out, r, a)
  if a["frontier"]["points"]:
    frontier.plot(r, a["frontier"], os.path.join(out, "frontier.png"))
  plot_data_efficiency(r, os.path.join(out, "data_efficiency.png"), a)
  plot_pareto(r, os.path.join(out, "pareto.png"), a)
  plot_retention(r, os.path.join(out, "ee_mllm_f_retention.png"), a)
  return a


def main(argv=None):
  """Redraws results.md and the plots from a results.json: `python benchmarks/results_report.py
  docs/results.json [OUT_DIR]` (OUT_DIR: the JSON's directory)."""
  import json  # pylint: disable=g-import-not-at-top

  argv = sys.argv[1:] if argv is None else argv
  if not argv:
    raise SystemExit(main.__doc__)
  with open(argv[0]) as f:
    r = json.load(f)
  if "priors" not in r or not all("units" in e for e in r.get("main", [])):
    raise SystemExit(f"{argv[0]} has no per-question units or answer priors: it was written before the "
                     "evidence report; rerun benchmarks/data_efficiency.py")
  out = argv[1] if len(argv) > 1 else os.path.dirname(os.path.abspath(argv[0]))
  write_all(out, r)
  print(f"wrote {os.path.join(out, 'results.md')}")


if __name__ == "__main__":
  main()
