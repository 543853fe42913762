"""ChartQA: open answers about a chart, scored by relaxed accuracy as lmms-eval's chartqa task
scores it (after Pix2Struct / Qwen-VL): an answer that reads as a number is right within 5%
relative error of a numeric, non-zero reference ("12%" reads as 0.12); any other answer must
equal the reference case-insensitively.

    test_human.json / test_augmented.json: [{imgname, query, label}] (or {"data": [...]}); the
    image is `png/<imgname>` under the image root (default: the file's directory, as the
    dataset ships: test/test_human.json beside test/png/). The split (human_test /
    augmented_test) is the record's "type", else read from the file name.
"""

from __future__ import annotations

import os

from ee_mllm_jax.evaluation.benchmarks import base

MAX_RELATIVE_CHANGE = 0.05


def as_number(text: str) -> float | None:
  """`text` as a float ("12%" -> 0.12), or None when it is not one."""
  try:
    return float(text.rstrip("%")) / 100 if text.endswith("%") else float(text)
  except ValueError:
    return None


def relaxed_correct(prediction: str, target: str, max_relative_change: float = MAX_RELATIVE_CHANGE) -> bool:
  """Within `max_relative_change` of a numeric, non-zero target; else equal ignoring case."""
  predicted, wanted = as_number(prediction), as_number(target)
  if predicted is not None and wanted:
    return abs(predicted - wanted) / abs(wanted) <= max_relative_change
  return prediction.lower() == target.lower()


def _split(path: str) -> str | None:
  name = os.path.basename(path).lower()
  return "human_test" if "human" in name else "augmented_test" if "augmented" in name else None


class ChartQA(base.Benchmark):
  name, title, metric, shown = "chartqa", "ChartQA", "relaxed_accuracy", ("relaxed_accuracy",)
  breakdowns = (("per_split", "split"),)

  def load(self, path, image_root):
    root, rows = base.image_root(path, image_root), base.Rows(path)
    questions = []
    for i, (r, where) in enumerate(base.each_row(base.load_json(path, None)[1], "question_id")):
      label = rows.field(r, "label", where, (str, int, float))
      qid = r.get("question_id", i)  # the dataset's files have no ids: the position in the file
      image = os.path.join("png", rows.field(r, "imgname", where))
      questions.append(base.file_question(root, qid, image, rows.field(r, "query", where), (str(label),),
                                          category=r.get("type") or _split(path)))
    return questions

  def score(self, q, output):
    return float(relaxed_correct(output, q.answers[0]))

  def record(self, q, output, option_scores):
    return dict(parsed=output, answers=list(q.answers), score=self.score(q, output), split=q.category)

  def summary(self, done):
    splits = {}
    for r in done:
      if r.get("split") is not None:
        splits.setdefault(r["split"], []).append(r["score"])
    return {"relaxed_accuracy": base.mean(r["score"] for r in done),
            "per_split": {k: base.mean(v) for k, v in sorted(splits.items())}}
