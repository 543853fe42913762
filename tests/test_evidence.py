"""benchmarks/evidence.py and the report on a crafted results dict in results.json's schema (3 modes x
2 sizes x 3 seeds, 40 units per benchmark): the informative rule (one benchmark sits exactly at its
prior), the headline, paired differences by hand, each claim's verdict on data built to decide it,
and the markdown and plots drawn from it. numpy only, no training."""

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import evidence as ev  # noqa: E402  pylint: disable=wrong-import-position
import results_report  # noqa: E402  pylint: disable=wrong-import-position

COLUMNS = ["open", "MMBench", "SEED", "TextVQA", "DocVQA"]
PRIORS = {"open": 0.21, "MMBench": 0.0039, "SEED": 0.25, "TextVQA": 0.125, "DocVQA": 0.13}
SIZES, SEEDS, Q, DEPTH = [500, 2000], [0, 1, 2], 40, 2
SAMPLES = 200  # bootstrap draws: enough for these tests, fast
# the true accuracy of LLaVA per (size, column); MMBench sits exactly at its prior for every model
LLAVA_P = {500: {"open": 0.55, "SEED": 0.6, "TextVQA": 0.5, "DocVQA": 0.45},
           2000: {"open": 0.75, "SEED": 0.8, "TextVQA": 0.7, "DocVQA": 0.65}}
FLOPS = {"llava": 100e6, "ee-mllm": 40e6, "flamingo": 50e6}


def crafted(*, ee_shift=0.0, flamingo_shift=-0.3, blank_like_real=True, ffn_off_shift=-0.3, flops=None):
  """A results dict: unit i of a column scores 1 where the column's fixed difficulty u_i < p (the
  same questions are hard for every model), p = the model's true accuracy plus a seed effect that
  every mode shares (seed i: the same data order; SD 3 points of accuracy) and a little noise of
  its own; MMBench's units all equal its prior."""
  rng = np.random.default_rng(0)
  difficulty = {c: rng.random(Q) for c in COLUMNS}
  effect = {(n, s): {c: rng.normal(0, 0.03) for c in COLUMNS} for n in SIZES for s in SEEDS}
  flops = flops or FLOPS

  def units(size: int, seed: int, shift: float) -> dict:
    out = {}
    for c in COLUMNS:
      if c == "MMBench":
        out[c] = {str(i): PRIORS[c] for i in range(Q)}
      else:
        q = LLAVA_P[size][c] + shift + effect[size, seed][c] + rng.normal(0, 0.005)
        out[c] = {str(i): float(difficulty[c][i] < q) for i in range(Q)}
    return out

  def row(name, mode, size, seed, u, flops_):
    return dict(name=name, mode=mode, size=size, seed=seed, units=u,
                scores={c: float(np.mean(list(v.values()))) for c, v in u.items()},
                extra={"MMBench rows": 0.3, "SEED lik.": 0.4}, mean=0.0, flops=flops_,
                train_flops=size * 6e9 * (1 + (mode == "flamingo")), train_seconds=size / 100, trainable=[1000, 9000])

  shift = {"llava": 0.0, "ee-mllm": ee_shift, "flamingo": flamingo_shift}
  main, blank, retention = [], [], []
  for mode in shift:
    for n in SIZES:
      for s in SEEDS:
        main.append(row(f"{mode}_{n}_seed{s}", mode, n, s, units(n, s, shift[mode]), flops[mode]))
  for e in [e for e in main if e["mode"] == "llava"]:
    real = e["units"]["open"]
    b = real if blank_like_real else {k: float(rng.random() < 0.2) for k in real}
    blank.append(dict(name=e["name"] + "_blank", mode="llava", size=e["size"], seed=e["seed"],
                      scores={"open": float(np.mean(list(b.values())))}, units={"open": b}))
    for k in range(DEPTH if e["size"] == SIZES[-1] else 1):
      for ffn in (True, False):
        u = e["units"] if ffn else units(e["size"], e["seed"], ffn_off_shift)
        retention.append(dict(row(f"{e['name']}_f_from{k}_{ffn}", "llava", e["size"], e["seed"], u,
                                  FLOPS["llava"] * (0.6 + 0.2 * k) * (1.05 if ffn else 1.0)),
                              variant=f"composite from layer {k}, visual FFN {'on' if ffn else 'off'}", n=k,
                              visual_ffn=ffn, base=e["name"]))
  speed = [dict(shape="tiny", image_size=336, v=576, mode=m, seconds=s, flops=f)
           for m, s, f in (("llava", 0.2, 2e10), ("ee-mllm", 0.06, 7e9), ("flamingo", 0.12, 1e10))]
  return dict(
      scale="default", command="python benchmarks/data_efficiency.py", machine="cpu", note="",
      timing={}, compute=dict(data=0.1, pretrain=1.0, align=2.0, eval=0.5, speed=0.2, total=3.8), wall_minutes=3.9,
      parts=dict(llm=dict(what="chat text", records=100, steps=10),
                 tower=dict(what="scenes with glyphs", records=100, steps=10,
                            held_out=dict(object_token_colour=0.9, object_token_shape=0.8, colour_counts=0.7,
                                          shape_counts=0.6, glyph_token=0.95))),
      shapes=dict(vision="96 wide", llm="128 wide", tokens=64, latents=16, image_size=48),
      recipe=dict(stage1_epochs=1, stage1_lr=2e-3, stage2_epochs=2, stage2_lr=1e-3, batch=32), text_len=20,
      speed=speed, speed_repeats=3, speed_text=64, gpu_rows=False,
      modes={"llava": "LLaVA (self)", "ee-mllm": "EE-MLLM (composite)", "flamingo": "Flamingo (cross)"},
      columns=COLUMNS, extra_columns=["MMBench rows", "SEED lik."], sizes=SIZES, seeds=SEEDS,
      schedule_size=SIZES[-1], val=200, priors=PRIORS, margin=3.0, informative_sds=3.0,
      main=main, blank=blank, retention=retention)


@pytest.fixture(scope="module")
def base():
  r = crafted()
  return r, ev.analyse(r, samples=SAMPLES)


def by_hand(r, mode, size, cols):
  """The headline of a cell from the rows' units, with numpy alone."""
  rows = [e for e in r["main"] if e["mode"] == mode and e["size"] == size]
  return np.mean([100 * np.mean([list(e["units"][c].values()) for e in rows]) for c in cols])


def test_the_benchmark_at_its_prior_is_uninformative_and_out_of_the_headline(base):
  r, a = base
  table = {t["column"]: t for t in a["informative"]}
  assert not table["MMBench"]["ok"] and table["MMBench"]["gap"] == pytest.approx(0.0, abs=1e-9)
  assert a["cols"] == ["open", "SEED", "TextVQA", "DocVQA"]
  assert all(table[c]["ok"] and table[c]["best"][1] == 2000 for c in a["cols"])  # the larger size learns more
  others = ["open", "SEED", "TextVQA", "DocVQA"]
  for (mode, size), cell in a["cells"].items():
    assert cell["headline"].mean == pytest.approx(by_hand(r, mode, size, others))
    assert cell["headline"].mean != pytest.approx(by_hand(r, mode, size, COLUMNS))
    assert cell["columns"]["MMBench"].mean == pytest.approx(100 * PRIORS["MMBench"])


def test_unit_matrix_sorts_seeds_aligns_units_and_names_a_mismatch(base):
  r, _ = base
  rows = [e for e in r["main"] if e["mode"] == "llava" and e["size"] == 500]
  shuffled = [dict(e, units={"open": dict(reversed(list(e["units"]["open"].items())))}) for e in rows[::-1]]
  assert np.array_equal(ev.unit_matrix(shuffled, "open"), ev.unit_matrix(rows, "open"))
  m = ev.unit_matrix(rows, "open")
  assert m.shape == (3, Q) and m[1].mean() == pytest.approx(100 * rows[1]["scores"]["open"])
  bad = dict(rows[2], units={"open": {**rows[2]["units"]["open"], "extra": 1.0}})
  with pytest.raises(ValueError, match="llava_500_seed2.*differ"):
    ev.unit_matrix(rows[:2] + [bad], "open")
  with pytest.raises(ValueError, match="twice"):
    ev.unit_matrix(rows + rows[:1], "open")


def test_paired_differences_equal_a_hand_computation(base):
  r, a = base
  cols = a["cols"]
  for other in ("llava", "flamingo"):
    hand = {n: by_hand(r, "ee-mllm", n, cols) - by_hand(r, other, n, cols) for n in SIZES}
    for n in SIZES:
      d = a["diff"][other][n][0.95]
      assert d.mean == pytest.approx(hand[n]) and d.low <= hand[n] <= d.high
      assert a["diff"][other][n][0.90].half_width <= d.half_width
    # seed i against seed i: the seed effect the modes share (the same data order) cancels
    assert a["diff"]["llava"][2000][0.95].seeds < 0.5 * a["cells"]["llava", 2000]["headline"].seeds
    d = a["diff"][other]["all"][0.95]
    assert d.mean == pytest.approx(np.mean(list(hand.values()))) and d.low <= d.mean <= d.high
    assert d.sources == "seeds+questions"


def test_claims_on_data_built_to_decide_them(base):
  _, a = base
  c = a["claims"]
  # Flamingo 30 points under, EE-MLLM = LLaVA up to noise of half a point of accuracy
  assert c["C1"]["verdict"] == "supported" and c["C1"]["diff"].low > 20
  assert c["C2"]["verdict"] == "supported" and -3 < c["C2"]["diff90"].low and c["C2"]["diff90"].high < 3
  assert c["C3"]["verdict"] == "supported" and c["C3"]["ee_vs_flamingo"] == pytest.approx(0.8)
  assert c["C3"]["ee_vs_llava"] == pytest.approx(0.4) and c["C3"]["speed"]["flamingo"] == [pytest.approx(0.5)]
  # the blank images score what the real ones do: no LLaVA model uses the image
  assert c["C4"]["verdict"] == "undecided" and c["C4"]["sizes"] == [] and "no LLaVA model uses the image" in c["C4"]["why"]
  lines = ev.claim_lines(crafted(), a)
  assert len(lines) == 4 and all(line.startswith("- ") for line in lines)
  assert "**supported**: EE − Flamingo +" in lines[0] and "95% interval [" in lines[0]
  assert "90% interval" in lines[1] and "±3" in lines[1]
  assert "0.80x Flamingo's" in lines[2] and "no noise" in lines[2]
  assert "**undecided (no LLaVA model uses the image)**" in lines[3]


def test_a_big_gap_contradicts_equivalence_and_equal_accuracy_at_more_flops_contradicts_c3():
  a = ev.analyse(crafted(ee_shift=-0.2, flamingo_shift=-0.2, flops={"llava": 100e6, "ee-mllm": 60e6,
                                                                     "flamingo": 50e6}), samples=SAMPLES)
  assert a["claims"]["C2"]["verdict"] == "contradicted" and a["claims"]["C2"]["diff90"].high < -3
  assert a["claims"]["C1"]["diff"].mean == pytest.approx(0.0, abs=1.0)
  assert a["claims"]["C1"]["verdict"] != "supported"
  assert a["claims"]["C3"]["verdict"] == "contradicted"  # more FLOPs than Flamingo, not more accurate


def test_c4_on_llava_models_that_use_the_image():
  a = ev.analyse(crafted(blank_like_real=False), samples=SAMPLES)
  c4 = a["claims"]["C4"]
  assert c4["sizes"] == SIZES and all(a["uses_image"][n]["ok"] for n in SIZES)
  assert c4["settings"][True]["verdict"] == "supported"  # the FFN-on variant scores what LLaVA does
  assert c4["settings"][False]["verdict"] == "contradicted"  # 30 points lower
  assert c4["verdict"] == "supported"
  line = ev.claim_lines(crafted(blank_like_real=False), a)[3]
  assert "on (the paper’s EE-MLLM-F) **supported**" in line and "off **contradicted**" in line
  sched = a["retention"]["schedule"]
  assert sorted({p["n"] for p in sched}) == list(range(DEPTH + 1))
  on = {p["n"]: p for p in sched if p["visual_ffn"]}
  assert on[0]["kept"].mean == pytest.approx(1.0) and on[DEPTH]["llava"] and on[DEPTH]["flops_saved"] == 0.0
  assert on[0]["flops_saved"] == pytest.approx(1 - 0.6 * 1.05)
  off = {p["n"]: p for p in sched if not p["visual_ffn"]}
  assert off[0]["kept"].high < 1.0 and off[0]["diff"].high < 0
  assert len(a["retention"]["at_zero"]) == 2 * len(SIZES)


def test_the_report_and_plots_from_a_results_json(base, tmp_path):
  r, a = base
  text = results_report.render(r, a)
  for line in ev.claim_lines(r, a):
    assert line in text
  for heading in ("## Benchmarks: informative or not", "## Mode x data size", "## Paired differences",
                  "## EE-MLLM-F", "## Speed"):
    assert heading in text
  assert "| MMBench | 0.4 |" in text and "**no** †" in text and "| MMBench† |" in text
  assert "95.0% of glyph tokens' character" in text
  assert "| **all** |" in text
  path = tmp_path / "results.json"
  path.write_text(json.dumps(r))
  results_report.main([str(path), str(tmp_path)])
  assert (tmp_path / "results.md").read_text(encoding="utf-8").startswith("# Results")
  for name in ("data_efficiency.png", "pareto.png", "ee_mllm_f_retention.png"):
    with Image.open(tmp_path / name) as im:
      assert im.format == "PNG" and min(im.size) > 200


def test_a_results_json_without_units_is_refused_by_name(tmp_path):
  r = crafted()
  old = dict(r, main=[{k: v for k, v in e.items() if k != "units"} for e in r["main"]])
  path = tmp_path / "old.json"
  path.write_text(json.dumps(old))
  with pytest.raises(SystemExit, match="no per-question units"):
    results_report.main([str(path), str(tmp_path)])


def test_the_frontier_places_each_setting_against_its_llava_model_and_marks_what_dominates():
  """Crafted frontier rows on the largest LLaVA models: a setting that keeps everything at half the
  FLOPs dominates one that keeps less at fewer savings; kept equals the headline ratio by hand;
  EE-MLLM-F's schedule points join as their own method; the section and plot are drawn."""
  import frontier  # pylint: disable=g-import-not-at-top
  r = crafted()
  size = SIZES[-1]
  llava = [e for e in r["main"] if e["mode"] == "llava" and e["size"] == size]
  worse = crafted(ee_shift=-0.2)["main"]  # its EE-MLLM rows: a model 20 points lower
  r["frontier"] = []
  for e in llava:
    low = next(x for x in worse if x["mode"] == "ee-mllm" and x["size"] == size and x["seed"] == e["seed"])
    r["frontier"].append(dict(e, name=e["name"] + "_good", method="FastV", setting="good", flops=0.5 * e["flops"]))
    r["frontier"].append(dict(low, name=e["name"] + "_bad", mode="llava", method="VisionZip", setting="bad",
                              flops=0.7 * e["flops"]))
  a = ev.analyse(r, samples=SAMPLES)
  f = frontier.analyse(r, a, samples=SAMPLES)
  points = {(p["method"], p["setting"]): p for p in f["points"]}
  good, bad = points["FastV", "good"], points["VisionZip", "bad"]
  assert good["flops_saved"] == pytest.approx(0.5) and bad["flops_saved"] == pytest.approx(0.3)
  assert good["kept"].mean == pytest.approx(1.0) and not good["dominated"]
  kept_by_hand = np.mean([
      np.mean([100 * np.mean(list(x["units"][c].values())) for c in a["cols"]]) /
      np.mean([100 * np.mean(list(e["units"][c].values())) for c in a["cols"]])
      for e, x in zip(sorted(llava, key=lambda e: e["seed"]),
                      sorted((x for x in r["frontier"] if x["setting"] == "bad"), key=lambda x: x["seed"]))])
  assert bad["kept"].mean == pytest.approx(kept_by_hand) and bad["kept"].mean < 0.9 and bad["dominated"]
  assert bad["diff"].high < 0 and good["diff"].mean == 0
  assert {p["method"] for p in f["points"]} == {"EE-MLLM-F", "FastV", "VisionZip"} and f["cols"] == a["cols"]
  text = frontier.section(r, f)
  assert "## Training-free reductions: one frontier" in text and "FastV: good" in text
  assert "VisionZip: bad" not in text.split("Not dominated")[1]
