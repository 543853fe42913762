"""docs/results.md is drawn from docs/results.json alone: redrawing it gives the same bytes, and
the plots come back as PNGs."""

import os
import subprocess
import sys

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_committed_report_redraws_from_its_results_json(tmp_path):
  done = subprocess.run([sys.executable, "benchmarks/results_report.py", "docs/results.json", str(tmp_path)],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  with open(os.path.join(ROOT, "docs", "results.md"), encoding="utf-8") as f:
    assert (tmp_path / "results.md").read_text(encoding="utf-8") == f.read()
  for name in ("data_efficiency.png", "pareto.png", "ee_mllm_f_retention.png"):
    with Image.open(tmp_path / name) as im:
      assert im.format == "PNG" and min(im.size) > 200


def test_the_compute_line_says_how_the_steps_ran():
  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  import results_report  # pylint: disable=g-import-not-at-top
  r = dict(compute=dict(data=0.5, pretrain=8.0, align=60.0, eval=30.0, speed=3.0, total=101.5), wall_minutes=2.0)
  one = results_report.compute_line(r)
  assert "one after another in one process" in one and "reusing cached steps" in one
  assert "reusing" not in results_report.compute_line(dict(r, wall_minutes=101.0))
  # side by side, the steps' sum overlaps: a short invocation proves no reuse, so none is claimed
  three = results_report.compute_line(dict(r, workers=3))
  assert "3 worker processes side by side" in three and "reusing" not in three and "one after another" not in three
