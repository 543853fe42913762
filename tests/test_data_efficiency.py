"""benchmarks/data_efficiency.py end to end at its tiny scale: every stage runs (data, pretrained
parts, two-stage alignment of the three modes, eval.py's scores, EE-MLLM-F along the schedule,
the speed table) and writes its tables and plots; what the tables must say regardless of how well
a minutes-long run learns; and a rerun reuses every cached step."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("llava", "ee-mllm", "flamingo")
# Two sizes keep the suite's run to a few minutes (every code path of the default's three runs);
# half an epoch per stage (one or two steps) and one timed repeat: what is checked here is that
# every stage runs and what the tables say by construction, not how well the models learn.
SMALL = ("--sizes", "32,64", "--spread_size", "32", "--stage1_epochs", "0.5", "--stage2_epochs", "0.5",
         "--speed_repeats", "1")
pytestmark = pytest.mark.slow  # the benchmark script end to end, in a subprocess


def run(out, work, *extra):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device: the script's own setup
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, "benchmarks/data_efficiency.py", "--scale", "tiny", "--out", str(out),
                         "--work", str(work), *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  with open(os.path.join(out, "results.json")) as f:
    return json.load(f), proc.stdout


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  root = tmp_path_factory.mktemp("data_efficiency")
  out, work = root / "docs", root / "work"
  report, _ = run(out, work, *SMALL)
  return report, out, work


def test_writes_the_report_and_its_plots(results):
  report, out, _ = results
  text = (out / "results.md").read_text()
  assert "python benchmarks/data_efficiency.py --scale tiny" in text and "Compute time" in text and "Machine" in text
  for name in ("data_efficiency.png", "ee_mllm_f_retention.png"):
    assert f"]({name})" in text
    with Image.open(out / name) as im:
      assert im.format == "PNG" and min(im.size) > 200
  for heading in ("## Mode x data size", "### Run-to-run spread", "## EE-MLLM-F", "## Speed"):
    assert heading in text


def test_every_mode_and_size_is_trained_and_scored(results):
  report, _, work = results
  sizes = report["sizes"]
  assert sorted((e["mode"], e["size"]) for e in report["main"]) == sorted((m, n) for m in MODES for n in sizes)
  assert sorted(e["mode"] for e in report["spread"]) == sorted(MODES)
  for e in report["main"] + report["spread"]:
    assert set(e["scores"]) >= {"open", "MMBench", "SEED"}, e["name"]
    assert all(0.0 <= s <= 1.0 for s in e["scores"].values())
    # the two stages really ran, for the same steps per sample in every mode
    for stage in ("stage1", "stage2"):
      with open(work / "runs" / f"{e['mode']}_{e['size']}_seed{e['seed']}" / stage / "done.json") as f:
        assert json.load(f)["step"] > 0
  steps = {(e["mode"], e["size"]): json.load(open(work / "runs" / f"{e['mode']}_{e['size']}_seed0" / "stage2" /
                                                  "done.json"))["step"] for e in report["main"]}
  for n in sizes:
    assert len({steps[(m, n)] for m in MODES}) == 1


def test_tables_say_what_the_design_implies(results):
  """No new parameters in EE-MLLM, new ones in Flamingo; composite prefill is cheaper than self;
  along the schedule the FLOPs saved shrink as more layers run self attention."""
  report, _, _ = results
  by = {(e["mode"], e["size"]): e for e in report["main"]}
  n = report["sizes"][0]
  assert by[("ee-mllm", n)]["trainable"] == by[("llava", n)]["trainable"]
  assert by[("flamingo", n)]["trainable"][0] > by[("llava", n)]["trainable"][0]
  assert by[("ee-mllm", n)]["flops"] < by[("llava", n)]["flops"]
  schedule = report["schedule"]
  depth = max(p["n"] for p in schedule)
  for ffn in (True, False):
    points = sorted((p["n"], p["flops_saved"]) for p in schedule if p["visual_ffn"] == ffn)
    assert [p[0] for p in points] == list(range(depth + 1))
    saved = [p[1] for p in points]
    assert all(a > b for a, b in zip(saved, saved[1:])) and saved[-1] == 0.0
  on = {p["n"]: p["flops_saved"] for p in schedule if p["visual_ffn"]}
  off = {p["n"]: p["flops_saved"] for p in schedule if not p["visual_ffn"]}
  assert all(off[k] > on[k] for k in range(depth))  # dropping the visual FFN saves more
  # EE-MLLM-F rows are the LLaVA model's weights: the variant at n = depth is LLaVA itself
  llava = by[("llava", max(report["sizes"]))]
  assert [p for p in schedule if p["n"] == depth][0]["mean"] == llava["mean"]


def test_speed_table_covers_three_modes_at_each_size(results):
  report, _, _ = results
  speed = report["speed"]
  assert {(e["image_size"], e["mode"]) for e in speed} == {(s, m) for s in (56, 84) for m in MODES}
  for e in speed:
    assert e["seconds"] > 0 and e["flops"] > 0
  flops = {(e["image_size"], e["mode"]): e["flops"] for e in speed}
  assert flops[(84, "ee-mllm")] < flops[(84, "llava")]
  assert all(flops[(84, m)] > flops[(56, m)] for m in MODES)


def test_rerun_reuses_every_cached_step(results, tmp_path):
  report, _, work = results
  again, stdout = run(tmp_path / "docs", work, *SMALL, "--skip_speed")
  assert again["main"] == report["main"] and again["retention"] == report["retention"]
  assert again["speed"] == [] and again["timing"]["align"] < 0.5  # minutes: nothing retrained
