"""SEED-Bench (image questions): multiple choice, the first letter of the output compared with the
answer (`metrics.seed_correct`, as lmms-eval), and the options also ranked by their likelihood.

    SEED-Bench.json: {"question_type": {name: id}, "questions": [{question_id, data_id,
    question_type_id, question, choice_a..choice_d, answer, data_type}]}; only data_type "image"
    questions are read (the video ones need frames).
"""

from __future__ import annotations


import numpy as np

from ee_mllm_jax.evaluation import metrics
from ee_mllm_jax.evaluation.benchmarks import base

# The synthetic file's question types (SEED-Bench's own ids for these two).
SYNTHETIC_TYPES = {"Instances Counting": 5, "Spatial Relation": 6}


class SEEDBench(base.Benchmark):
  name, title, metric = "seedbench", "SEED-Bench", "accuracy"
  shown = ("accuracy", "likelihood_accuracy")
  breakdowns = (("per_question_type", "question type"), ("likelihood_per_question_type", "likelihood, type"))
  ranks_options = True
  synthetic_kind, synthetic_file = "choice_spatial", "seed_bench.json"

  def load(self, path, image_root):
    root, rows = base.image_root(path, image_root), base.Rows(path)
    doc, items = base.load_json(path, "questions")
    type_names = {v: k for k, v in (doc.get("question_type") or {}).items()}
    questions = []
    for r, where in base.each_row(items, "question_id", "questions"):
      if rows.field(r, "data_type", where) != "image":
        continue
      options = {c: rows.field(r, f"choice_{c.lower()}", where, (str, int, float)) for c in "ABCD"}
      answer = str(rows.field(r, "answer", where, (str, int))).strip()
      if answer not in options:
        rows.fail(where, f"answer {answer!r} is not one of A-D")
      type_id = rows.field(r, "question_type_id", where, (int, str))
      image = rows.field(r, "data_id", where)
      questions.append(base.file_question(
          root, rows.field(r, "question_id", where, (int, str)), image, rows.field(r, "question", where), (answer,),
          options={k: str(v) for k, v in options.items()},
          category=type_names.get(type_id, type_names.get(str(type_id), str(type_id)))))
    return questions

  def score(self, q, output):
    return float(metrics.seed_correct(output, q.answers[0]))

  def record(self, q, output, option_scores):
    r = dict(parsed=metrics.seed_letter(output), answer=q.answers[0],
             correct=metrics.seed_correct(output, q.answers[0]), question_type=q.category)
    if option_scores is not None:
      best = list(q.options)[int(np.argmax(option_scores))]
      r.update(option_logprobs=option_scores, likelihood_choice=best, likelihood_correct=best == q.answers[0])
    return r

  def unit_scores(self, done, metric=None):
    """Per question: the generated letter right (the headline, "accuracy"), or with
    "likelihood_accuracy" the likelihood ranking right (the questions that were ranked)."""
    self.check_unit_metric(metric, "likelihood_accuracy")
    if metric != "likelihood_accuracy":
      return super().unit_scores(done)
    return {str(r["question_id"]): float(r["likelihood_correct"]) for r in done if "likelihood_correct" in r}

  def summary(self, done):
    out = {"accuracy": base.mean(r["correct"] for r in done),
           "per_question_type": metrics.accuracy_by(done, "question_type"),
           "unparseable": sum(r["parsed"] not in "ABCD" or not r["parsed"] for r in done)}
    ranked = [r for r in done if "likelihood_correct" in r]
    if ranked:
      out["likelihood_accuracy"] = sum(r["likelihood_correct"] for r in ranked) / len(ranked)
      out["likelihood_per_question_type"] = metrics.accuracy_by(
          [dict(question_type=r["question_type"], correct=r["likelihood_correct"]) for r in ranked], "question_type")
    return out

  def write_synthetic(self, path, rows, root):
    del root
    questions = [{"question_id": str(i), "question": r["question"], "answer": r["answer"],
                  **{f"choice_{letter.lower()}": o for letter, o in zip("abcd", r["options"])},
                  "data_id": r["image"], "data_type": "image", "question_type_id": SYNTHETIC_TYPES[r["category"]]}
                 for i, r in rows]
    base.write_json(path, {"question_type": SYNTHETIC_TYPES, "questions": questions})
