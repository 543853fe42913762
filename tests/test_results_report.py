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
