"""The training-free frontier of benchmarks/data_efficiency.py: EE-MLLM-F against FastV and
VisionZip-style reduction, and their combinations, on the same LLaVA-trained models.

Every setting is one model's mode override (`ModelConfig.run_as`), scored by eval.py's road on the
LLaVA models of the largest size (every seed), and placed by two numbers against the model it
runs: the analytic prefill FLOPs it saves per sample, and the accuracy it keeps (the setting's
headline over the model's, per seed; the difference in points with both noise sources). EE-MLLM-F
enters as the layer schedule's points, which the EE-MLLM-F section scores already. VisionZip's
counts are shares of the tower's tokens (dominant : contextual = 3 : 1), so one setting means the
same at the experiment's 64 tokens per image and at LLaVA-1.5's 576 (VisionZip's own 64-token
setting at 576 is 54 + 10, 11%).

Which setting dominates: a point is dominated when another saves at least as many FLOPs and keeps
at least as much (means), one of them strictly; the report lists the points nothing dominates.
"""

from __future__ import annotations

import math
import os

import evidence as ev


EE_F = "EE-MLLM-F"
_F = dict(attention="composite", visual_ffn=True)  # EE-MLLM-F as the paper runs it (visual FFN kept)


def settings(depth: int, tokens: int) -> list[tuple[str, str, dict]]:
  """(method, setting, run_as overrides) of every frontier setting for an LLM of `depth` layers and a
  tower of `tokens` per image: FastV at K = 1 and K = depth // 2, R = 50% and 75%; VisionZip
  keeping 50%, 25% and 12.5% of the tokens; EE-MLLM-F from layer 0 with FastV or VisionZip; the
  schedule from layer depth // 2 with FastV there. K and the schedule's layer are layer indices, so
  the same names apply the same overrides to a deeper model."""
  half = max(1, depth // 2)
  fastv = lambda k, r: dict(fastv_layer=k, fastv_ratio=r)
  zipped = lambda share: dict(visionzip_dominant=max(1, round(0.75 * share * tokens)),
                              visionzip_contextual=max(1, round(0.25 * share * tokens)))
  out = [("FastV", f"K={k} R={r:.0%}", fastv(k, r)) for k in sorted({1, half}) for r in (0.5, 0.75)]
  out += [("VisionZip", f"{100 * share:g}% of the tokens", zipped(share)) for share in (0.5, 0.25, 0.125)]
  out += [("EE-MLLM-F + FastV", f"from layer 0, K={half} R=50%", dict(_F, **fastv(half, 0.5))),
          ("EE-MLLM-F + VisionZip", "from layer 0, 25% of the tokens", dict(_F, **zipped(0.25))),
          ("schedule + FastV", f"composite from layer {half}, K={half} R=50%",
           dict(_F, composite_from_layer=half, **fastv(half, 0.5)))]
  return out


def slug(method: str, setting: str) -> str:
  """The eval's variant name: "z_fastv_k_2_r_50" for ("FastV", "K=2 R=50%")."""
  words = "".join(c if c.isalnum() else " " for c in f"{method} {setting}".lower()).split()
  return "z_" + "_".join(words)


def rows(study, run: dict, base: dict, depth: int, tokens: int) -> list[dict]:
  """Every setting on the LLaVA model `run` (scored `base`), one eval each (cached)."""
  out = []
  for method, setting, flags in settings(depth, tokens):
    e = study.scored(run, slug(method, setting), **flags)
    e.update(method=method, setting=setting, base=base["name"], flops_saved=1 - e["flops"] / base["flops"])
    out.append(e)
  return out


def at_7b(depth: int, text_len: int = 64) -> dict[str, float]:
  """Analytic prefill FLOPs saved per setting (named for an LLM of `depth` layers) at LLaVA-1.5-7B's
  shape (576 tokens, one image)."""
  import ee_mllm_jax as eem  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax import flops  # pylint: disable=g-import-not-at-top
  cfg = eem.ModelConfig.preset("llava-1.5-7b")
  total = lambda c: flops.forward_flops(c, batch=1, num_images=1, text_len=text_len)["total"]
  ref = total(cfg)
  out = {f"{m}: {s}": 1 - total(cfg.run_as(**f)) / ref for m, s, f in settings(depth, cfg.tokens_per_image)}
  for n in range(depth):
    for ffn in (True, False):
      out[ee_f_name(n, ffn)] = 1 - total(cfg.run_as(attention="composite", visual_ffn=ffn,
                                                     composite_from_layer=n)) / ref
  return out


def ee_f_setting(n: int, ffn: bool) -> str:
  """The name of EE-MLLM-F's schedule point n (layers [n, L) composite)."""
  return f"from layer {n}, visual FFN {'on' if ffn else 'off'}"


def ee_f_name(n: int, ffn: bool) -> str:
  return f"{EE_F}: {ee_f_setting(n, ffn)}"


# ------------------------------------------------------------------------------------ analysis


def analyse(r: dict, a: dict, *, samples: int) -> dict:
  """The frontier's points (`ev.versus_base` of each setting on the largest size's LLaVA models),
  EE-MLLM-F's along the schedule included, the columns they are scored on, and the points that
  nothing dominates."""
  size = r["schedule_size"]
  base = ev.cells(r["main"]).get((ev.LLAVA, size))
  cols, fallback = (a["cols"], False) if a["cols"] else (["open"], True)
  groups: dict[tuple[str, str], list[dict]] = {}
  for e in r.get("frontier") or []:
    groups.setdefault((e["method"], e["setting"]), []).append(e)
  for e in r.get("retention") or []:
    if e["size"] == size:
      groups.setdefault((EE_F, ee_f_setting(e["n"], e["visual_ffn"])), []).append(e)
  points = []
  if base:
    for (method, setting), rs in groups.items():
      points.append(dict(method=method, setting=setting, **ev.versus_base(rs, base, cols, samples=samples)))
  points.sort(key=lambda p: (p["method"] != EE_F, p["method"], -p["flops_saved"]))
  for p in points:
    p["dominated"] = p["kept"] is not None and any(q is not p and _dominates(q, p) for q in points)
  return dict(points=points, cols=cols, fallback=fallback, size=size, uses_image=a["uses_image"].get(size, {}))


def _dominates(q: dict, p: dict) -> bool:
  """q saves at least as many FLOPs and keeps at least as much as p (means), one strictly."""
  if q["kept"] is None:
    return False
  at_least = q["flops_saved"] >= p["flops_saved"] and q["kept"].mean >= p["kept"].mean
  return at_least and (q["flops_saved"] > p["flops_saved"] or q["kept"].mean > p["kept"].mean)


def _kept(x) -> str:
  if x is None:
    return "–"
  return f"{100 * x.mean:.1f}" + ("" if math.isnan(x.half_width) else f" ± {100 * x.half_width:.1f}")


def section(r: dict, f: dict) -> str:
  """The report's frontier section (markdown)."""
  if not f["points"]:
    return ""
  import results_report as rr  # pylint: disable=g-import-not-at-top
  seven, speed = r.get("frontier_7b") or {}, {e["name"]: e for e in r.get("frontier_speed") or []}
  rows_ = []
  for p in f["points"]:
    name = f"{p['method']}: {p['setting']}"
    s = speed.get(name)
    rows_.append([p["method"], p["setting"], rr.pct(p["flops_saved"]), _kept(p["kept"]), rr.signed(p["diff"]),
                  rr.pct(seven.get(name)), f"{s['speedup']:.2f}x" if s else "–", "" if p["dominated"] else "**yes**"])
  header = ["method", "setting", "FLOPs saved (%)", "kept (%)", "− LLaVA (95%)", "FLOPs saved at 7B (%)",
            "prefill speed-up (scaled 7B, CPU)", "on the frontier"]
  which = (f"the informative benchmarks ({', '.join(f['cols'])})" if not f["fallback"] else
           "the open questions alone (no benchmark is informative yet, so this is a reading, not a verdict)")
  best = [f"{p['method']}: {p['setting']}" for p in f["points"] if not p["dominated"] and p["kept"] is not None]
  image = f["uses_image"]
  parts = [
      "## Training-free reductions: one frontier",
      f"Every setting runs the LLaVA models of {f['size']} samples (every seed) unchanged, scored on {which}. "
      "`kept` is the setting's headline over the model's own, per seed (t interval over seeds); the difference "
      "adds the question bootstrap. FLOPs saved: analytic prefill FLOPs per sample against the same model, at "
      "the experiment's shape and at LLaVA-1.5-7B's (576 tokens, 64 text tokens). The speed-up is measured "
      "prefill time at the width-scaled 7B shape (benchmarks/reduction_prefill.py's model), one run. FastV's K "
      "and the schedule's layer are layer indices, the same numbers at 7B (FastV's own setting is K=2 of 32 "
      "layers; here K=2 is half the depth). "
      + ("That LLaVA model uses the image (open with images above blank images by the rule), so keeping its "
         "accuracy means something." if image.get("ok") else
         "The rule does not (yet) show that this LLaVA model uses the image, so keeping its accuracy decides "
         "little."),
      rr.rtable(header, rows_, 2),
      "Not dominated (no other setting saves at least as many FLOPs and keeps at least as much): "
      + ("; ".join(best) if best else "none scored") + ".",
      "![frontier](frontier.png)"]
  return "\n\n".join(parts) + "\n"


def plot(r: dict, f: dict, path: str):
  """Accuracy kept (± interval) against prefill FLOPs saved, one series per method."""
  import results_report as rr  # pylint: disable=g-import-not-at-top
  plt = rr._pyplot()  # pylint: disable=protected-access
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for method in dict.fromkeys(p["method"] for p in f["points"]):
    pts = sorted((p for p in f["points"] if p["method"] == method and p["kept"] is not None),
                 key=lambda p: p["flops_saved"])
    if not pts:
      continue
    hw = [0.0 if math.isnan(p["kept"].half_width) else 100 * p["kept"].half_width for p in pts]
    ax.errorbar([100 * p["flops_saved"] for p in pts], [100 * p["kept"].mean for p in pts], yerr=hw, fmt="o",
                capsize=3, label=method)
  front = sorted((p for p in f["points"] if not p["dominated"] and p["kept"] is not None),
                 key=lambda p: p["flops_saved"])
  if front:
    ax.plot([100 * p["flops_saved"] for p in front], [100 * p["kept"].mean for p in front], "k:", lw=1,
            label="frontier")
  rr.finish_kept_plot(fig, plt, ax, path, xlabel="prefill FLOPs saved vs the LLaVA model (%)",
                      ylabel="accuracy kept (%)", legend=7,
                      title=f"Training-free settings on the LLaVA models ({f['size']} samples)")


def speed_rows(measured: dict[str, tuple[float, float]]) -> list[dict]:
  """reduction_prefill's {name: (ms, flops)} -> rows with the speed-up over "LLaVA"."""
  ms0 = measured["LLaVA"][0]
  return [dict(name=k, ms=v[0], speedup=ms0 / v[0], flops=v[1]) for k, v in measured.items()]
