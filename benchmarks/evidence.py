"""The evidence in the data-efficiency experiment's results.json, and a verdict on each of the
paper's four claims. Pure functions of the results dict (numpy and
`ee_mllm_jax.evaluation.intervals`); `results_report.py` draws them.

Scores are in points (100 x the fractions results.json stores). A cell is one (mode, size): its
rows are the seeds. Every interval is 95% unless it says otherwise and combines two sources of
noise: Student's t over the seeds and a bootstrap over the questions (`intervals`).

* **Informative benchmarks**: a column counts only where its best cell beats the column's answer
  prior by more than `informative_sds` SDs of that cell's per-seed means. The rest are shown,
  marked, and kept out of every headline.
* **Headline** of a cell: the mean over the informative columns of the column scores;
  `intervals.mean_of_benchmarks` gives its interval (seeds paired across columns, the question
  bootstrap stratified by column).
* **Paired differences** EE-MLLM − LLaVA and EE-MLLM − Flamingo: seed i with seed i, unit by unit,
  per size and over all sizes (the mean over sizes of the per-size headline difference; seeds paired
  by seed id across sizes, the bootstrap stratified by (size, column)).

    a = analyse(results)                    # every number the report shows
    claim_lines(results, a)                 # one markdown bullet per claim, for the README
"""

from __future__ import annotations

import math

import numpy as np

from ee_mllm_jax.evaluation import intervals as iv

LLAVA, EE, FLAMINGO = "llava", "ee-mllm", "flamingo"
LEVEL = 0.95
CLAIMS = {
    "C1": "EE-MLLM is far more data-efficient than Flamingo",
    "C2": "EE-MLLM is about as data-efficient as LLaVA",
    "C3": "EE-MLLM is about as compute-efficient as Flamingo (and far more than LLaVA)",
    "C4": "EE-MLLM-F keeps a LLaVA model's accuracy without training",
}


# ------------------------------------------------------------------------------------ matrices


def unit_matrix(rows: list[dict], column: str) -> np.ndarray:
  """(S, Q) points of `rows` (one model's seeds) on `column`: rows sorted by seed, units aligned
  by id (sorted). Refuses rows that repeat a seed or whose unit ids differ, naming the row."""
  if not rows:
    raise ValueError(f"no rows to score on {column}")
  rows = sorted(rows, key=lambda e: e["seed"])
  seeds = [e["seed"] for e in rows]
  if len(set(seeds)) != len(seeds):
    raise ValueError(f"{column}: a seed appears twice among {[e['name'] for e in rows]}")
  ref = rows[0]
  if column not in ref.get("units", {}):
    raise ValueError(f"{ref['name']} has no units for {column}")
  ids = sorted(ref["units"][column])
  out = np.empty((len(rows), len(ids)))
  for i, e in enumerate(rows):
    units = e.get("units", {}).get(column)
    if units is None:
      raise ValueError(f"{e['name']} has no units for {column}")
    if set(units) != set(ids):
      missing, extra = sorted(set(ids) - set(units)), sorted(set(units) - set(ids))
      raise ValueError(f"{e['name']}: the units of {column} differ from {ref['name']}'s "
                       f"(missing {missing[:5]}, extra {extra[:5]})")
    out[i] = [units[k] for k in ids]
  return 100.0 * out


def seeds_of(rows: list[dict]) -> list:
  return sorted(e["seed"] for e in rows)


def cells(rows: list[dict]) -> dict[tuple[str, int], list[dict]]:
  """Rows grouped by (mode, size)."""
  out: dict[tuple[str, int], list[dict]] = {}
  for e in rows:
    out.setdefault((e["mode"], e["size"]), []).append(e)
  return out


def columns(r: dict) -> list[str]:
  """The score columns the main rows have units for, in `columns` order."""
  return [c for c in r["columns"] if all(c in e.get("units", {}) for e in r["main"])]


def _paired(a: list[dict], b: list[dict], cols: list[str]) -> list[np.ndarray]:
  """a - b per column, seed i with seed i (the seed ids must match)."""
  if seeds_of(a) != seeds_of(b):
    raise ValueError(f"unpaired seeds: {a[0]['name']} has {seeds_of(a)}, {b[0]['name']} has {seeds_of(b)}")
  return [unit_matrix(a, c) - unit_matrix(b, c) for c in cols]


def per_seed_headline(rows: list[dict], cols: list[str]) -> np.ndarray:
  """Each seed's headline (the mean over `cols` of its column scores), seeds sorted."""
  return np.mean([unit_matrix(rows, c).mean(axis=1) for c in cols], axis=0)


def seeds_interval(per_seed: np.ndarray, level: float = LEVEL) -> iv.Interval:
  """Student's t interval over seeds alone (for ratios such as `kept`)."""
  m, h = float(np.mean(per_seed)), iv.seed_half_width(np.asarray(per_seed, np.float64), level)
  return iv.Interval(m, m - h, m + h, level, "seeds", h, math.nan)


# ------------------------------------------------------------------------------------ analysis


def informative_table(r: dict) -> list[dict]:
  """Per column: its prior (points), the best (mode, size) cell, its mean, gap, threshold (sds x
  SD) and `ok` (`intervals.best_vs_prior`)."""
  sds = r.get("informative_sds", 3.0)
  groups = cells(r["main"])
  out = []
  for c in columns(r):
    if c not in r["priors"]:
      raise ValueError(f"results.json gives no answer prior for {c}")
    prior = 100.0 * r["priors"][c]
    models = {key: unit_matrix(rows, c) for key, rows in groups.items()}
    d = iv.best_vs_prior(models, prior, sds=sds)
    out.append(dict(d, column=c, prior=prior, sds=sds))
  return out


def headline(matrices: list[np.ndarray], samples: int, level: float = LEVEL) -> iv.Interval | None:
  return iv.mean_of_benchmarks(matrices, level=level, samples=samples) if matrices else None


def differences(r: dict, cols: list[str], other: str, *, samples: int) -> dict:
  """EE-MLLM − `other` headline: per size and "all" (mean over sizes), at 95% and at 90% (the
  TOST interval)."""
  groups = cells(r["main"])
  sizes = [n for n in r["sizes"] if (EE, n) in groups and (other, n) in groups]
  per = {n: _paired(groups[EE, n], groups[other, n], cols) for n in sizes}
  if len({tuple(seeds_of(groups[EE, n])) for n in sizes}) > 1:
    raise ValueError(f"averaging over sizes pairs seeds by id: every size needs the same seeds, got "
                     f"{ {n: seeds_of(groups[EE, n]) for n in sizes} }")
  out = {}
  for key, mats in [(n, per[n]) for n in sizes] + [("all", [m for n in sizes for m in per[n]])]:
    out[key] = {lvl: headline(mats, samples, lvl) for lvl in (0.95, 0.90)}
  return out


def flops_by_mode(r: dict) -> dict[str, float]:
  """Analytic prefill FLOPs per sample of each mode (the mean over its rows: one config per mode)."""
  return {m: float(np.mean([e["flops"] for e in r["main"] if e["mode"] == m]))
          for m in r["modes"] if any(e["mode"] == m for e in r["main"])}


def speed_ratios(r: dict) -> dict[str, list[float]]:
  """Measured prefill time EE-MLLM / LLaVA and EE-MLLM / Flamingo, one per speed shape."""
  out = {LLAVA: [], FLAMINGO: []}
  rows = r.get("speed") or []
  for e in rows:
    if e["mode"] != EE:
      continue
    for other in out:
      ref = [x for x in rows if x["mode"] == other and x["shape"] == e["shape"] and x["v"] == e["v"]]
      if ref:
        out[other].append(e["seconds"] / ref[0]["seconds"])
  return out


def uses_image(r: dict) -> dict[int, dict]:
  """Per size: whether the LLaVA model's open score with images beats its blank-image open score by
  more than `informative_sds` SDs of the per-seed differences (seed i with seed i)."""
  sds = r.get("informative_sds", 3.0)
  real, blank = cells(r["main"]), cells(r.get("blank") or [])
  out = {}
  for n in r["sizes"]:
    if (LLAVA, n) not in real or (LLAVA, n) not in blank:
      continue
    d = _paired(real[LLAVA, n], blank[LLAVA, n], ["open"])[0]
    test = iv.best_vs_prior({"images - blank": d}, 0.0, sds=sds)
    out[n] = dict(test, diff=iv.interval(d))
  return out


def _variants(r: dict, size: int, n: int, ffn: bool) -> list[dict]:
  return [e for e in r.get("retention") or [] if e["size"] == size and e["n"] == n and e["visual_ffn"] == ffn]


def retention_point(r: dict, cols: list[str], size: int, n: int, ffn: bool, *, samples: int) -> dict | None:
  """EE-MLLM-F from layer n (visual FFN `ffn`) on the LLaVA model of `size`, against that model:
  `kept` (variant headline / LLaVA headline per seed, t interval over seeds), `diff` (variant −
  LLaVA headline, both sources, 95%), `diff90` (the TOST interval) and `flops_saved`."""
  rows, base = _variants(r, size, n, ffn), cells(r["main"]).get((LLAVA, size))
  if not rows or not base:
    return None
  return dict(size=size, n=n, visual_ffn=ffn, **versus_base(rows, base, cols, samples=samples))


def versus_base(rows: list[dict], base: list[dict], cols: list[str], *, samples: int) -> dict:
  """A setting's rows (one per seed) against the model's own rows on `cols`: `flops_saved`, `seeds`,
  `kept` (headline ratio per seed, t interval over seeds), `diff` (setting − model, both sources,
  95%) and `diff90` (the TOST interval); the three are None without columns."""
  saved = 1 - float(np.mean([e["flops"] for e in rows])) / float(np.mean([e["flops"] for e in base]))
  point = dict(flops_saved=saved, seeds=len(rows), kept=None, diff=None, diff90=None)
  if cols:
    mats = _paired(rows, base, cols)
    point.update(kept=seeds_interval(per_seed_headline(rows, cols) / per_seed_headline(base, cols)),
                 diff=headline(mats, samples), diff90=headline(mats, samples, 0.90))
  return point


def retention(r: dict, cols: list[str], *, samples: int) -> dict:
  """n = 0 at every size, and the schedule (every n, and n = depth: LLaVA itself) at schedule_size."""
  rows = r.get("retention") or []
  at_zero = [p for n in r["sizes"] for ffn in (True, False)
             if (p := retention_point(r, cols, n, 0, ffn, samples=samples))]
  size = r["schedule_size"]
  ns = sorted({e["n"] for e in rows if e["size"] == size})
  schedule = [p for k in ns for ffn in (True, False) if (p := retention_point(r, cols, size, k, ffn, samples=samples))]
  if schedule:
    one = seeds_interval(np.ones(schedule[0]["seeds"]))
    for ffn in (True, False):
      schedule.append(dict(size=size, n=ns[-1] + 1, visual_ffn=ffn, flops_saved=0.0, seeds=schedule[0]["seeds"],
                           kept=one if cols else None, diff=None, diff90=None, llava=True))
  return dict(at_zero=at_zero, schedule=schedule)


def claim_c4(r: dict, cols: list[str], image: dict[int, dict], *, samples: int) -> dict:
  """Equivalence (±margin) of EE-MLLM-F from layer 0 and the LLaVA model, on the sizes whose LLaVA
  model uses the image; one verdict per FFN setting (the paper's EE-MLLM-F keeps the FFN)."""
  margin = r.get("margin", 3.0)
  sizes = [n for n, t in image.items() if t["ok"]]
  out = dict(sizes=sizes, settings={})
  if not sizes or not cols:
    why = "no LLaVA model uses the image" if not sizes else "no informative benchmark"
    out.update(verdict="undecided", why=why)
    return out
  base = cells(r["main"])
  for ffn in (True, False):
    mats = []
    for n in sizes:
      rows = _variants(r, n, 0, ffn)
      if rows:
        mats += _paired(rows, base[LLAVA, n], cols)
    if not mats:
      continue
    d90 = headline(mats, samples, 0.90)
    out["settings"][ffn] = dict(verdict=iv.equivalent(d90, margin=margin), diff90=d90, diff=headline(mats, samples))
  first = out["settings"].get(True) or next(iter(out["settings"].values()), None)
  out.update(verdict=first["verdict"] if first else "undecided", why="" if first else "no EE-MLLM-F rows")
  return out


def analyse(r: dict, *, samples: int = iv.BOOTSTRAP_SAMPLES) -> dict:
  """Every number the report and the claims show: `informative` (per column), `cols` (the
  informative ones), `cells` {(mode, size): {"columns": {c: Interval}, "headline": Interval,
  "train_flops", "flops", "train_seconds", "seeds"}}, `diff` {other mode: differences()},
  `flops`, `speed`, `uses_image`, `claims` {C1..C4: {"verdict", ...}}, `retention`."""
  margin = r.get("margin", 3.0)
  inform = informative_table(r)
  cols = [t["column"] for t in inform if t["ok"]]
  out_cells = {}
  for key, rows in cells(r["main"]).items():
    mats = {c: unit_matrix(rows, c) for c in columns(r)}
    out_cells[key] = dict(
        columns={c: iv.interval(m, samples=samples) for c, m in mats.items()},
        headline=headline([mats[c] for c in cols], samples), seeds=len(rows),
        train_flops=float(np.mean([e["train_flops"] for e in rows])), flops=float(np.mean([e["flops"] for e in rows])),
        train_seconds=float(np.mean([e["train_seconds"] for e in rows])), trainable=rows[0]["trainable"],
        extra={k: float(np.mean([e.get("extra", {}).get(k, math.nan) for e in rows]))
               for k in r.get("extra_columns", []) if any(k in e.get("extra", {}) for e in rows)})
  diff = {other: differences(r, cols, other, samples=samples) if cols else {} for other in (LLAVA, FLAMINGO)}
  flops, image = flops_by_mode(r), uses_image(r)
  claims = {}
  d = diff[FLAMINGO].get("all", {}).get(0.95)
  claims["C1"] = dict(verdict=iv.superiority(d) if d else "undecided", diff=d)
  d90 = diff[LLAVA].get("all", {}).get(0.90)
  claims["C2"] = dict(verdict=iv.equivalent(d90, margin=margin) if d90 else "undecided", diff90=d90,
                      diff=diff[LLAVA].get("all", {}).get(0.95))
  ee, fl = flops.get(EE), flops.get(FLAMINGO)
  verdict = "undecided"
  if d is not None and ee is not None and fl is not None:
    if ee <= fl and d.low > -margin:
      verdict = "supported"
    elif ee > fl and d.high < margin:
      verdict = "contradicted"
  claims["C3"] = dict(verdict=verdict, diff=d, ee_vs_llava=ee / flops[LLAVA] if ee and flops.get(LLAVA) else None,
                      ee_vs_flamingo=ee / fl if ee and fl else None, speed=speed_ratios(r))
  claims["C4"] = claim_c4(r, cols, image, samples=samples)
  return dict(informative=inform, cols=cols, cells=out_cells, diff=diff, flops=flops, uses_image=image,
              claims=claims, retention=retention(r, cols, samples=samples), margin=margin,
              sds=r.get("informative_sds", 3.0))


# ------------------------------------------------------------------------------------ words


def signed(x: iv.Interval) -> str:
  """"+6.1 points, 95% interval [2.3, 9.9]"."""
  return f"{x.mean:+.1f} points, {round(100 * x.level)}% interval [{x.low:.1f}, {x.high:.1f}]"


def _range(xs: list[float]) -> str:
  return f"{min(xs):.2f}" if max(xs) - min(xs) < 0.005 else f"{min(xs):.2f}–{max(xs):.2f}"


def claim_lines(r: dict, a: dict | None = None) -> list[str]:
  """One markdown bullet per claim: the claim, the verdict in bold, the interval that decides it,
  and the rule."""
  a = a if a is not None else analyse(r)
  c, m = a["claims"], a["margin"]
  sizes = ", ".join(map(str, r["sizes"]))
  none = "no informative benchmark, no headline"
  scope = (f"headline = mean over the informative benchmarks ({', '.join(a['cols']) or 'none'}), averaged over "
           f"sizes {sizes}, seeds paired")
  lines = []
  d = c["C1"]["diff"]
  lines.append(f"- {CLAIMS['C1']}: **{c['C1']['verdict']}**: EE − Flamingo "
               f"{signed(d) if d else none} ({scope}; supported when the interval lies above 0, contradicted "
               "when below).")
  d90 = c["C2"]["diff90"]
  lines.append(f"- {CLAIMS['C2']}: **{c['C2']['verdict']}**: EE − LLaVA {signed(d90) if d90 else none} ({scope}; "
               f"equivalence margin ±{m:g} points fixed in advance, two one-sided tests at 5%: supported when the "
               f"90% interval lies inside ±{m:g}, contradicted when wholly outside).")
  c3 = c["C3"]
  ratios = (f"EE-MLLM's prefill FLOPs per sample are {c3['ee_vs_flamingo']:.2f}x Flamingo's and "
            f"{c3['ee_vs_llava']:.2f}x LLaVA's (analytic, exact: no noise)") if c3["ee_vs_flamingo"] else "no FLOPs"
  speed = c3["speed"]
  if speed[FLAMINGO] and speed[LLAVA]:
    ratios += (f"; measured prefill time {_range(speed[FLAMINGO])}x Flamingo's and {_range(speed[LLAVA])}x "
               f"LLaVA's over {len(speed[FLAMINGO])} shape(s)")
  lines.append(f"- {CLAIMS['C3']}: **{c3['verdict']}**: {ratios}; EE − Flamingo "
               f"{signed(c3['diff']) if c3['diff'] else none} (supported when EE's FLOPs ≤ Flamingo's and the "
               f"low bound > −{m:g}, contradicted when EE's FLOPs > Flamingo's and the high bound < {m:g}).")
  c4 = c["C4"]
  rule = (f"on the LLaVA models that use the image: open score with images above blank images by more than "
          f"{a['sds']:g} SDs of the per-seed differences")
  if not c4["settings"]:
    lines.append(f"- {CLAIMS['C4']}: **undecided ({c4['why']})** ({rule}).")
  else:
    parts = [f"visual FFN {'on (the paper’s EE-MLLM-F)' if ffn else 'off'} **{s['verdict']}**: EE-MLLM-F − LLaVA "
             f"{signed(s['diff90'])}" for ffn, s in c4["settings"].items()]
    lines.append(f"- {CLAIMS['C4']}: {'; '.join(parts)} (composite from layer 0, {rule}: sizes "
                 f"{', '.join(map(str, c4['sizes']))}; headline over the informative benchmarks; equivalence "
                 f"±{m:g} points, 90% interval).")
  return lines
