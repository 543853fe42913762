"""DocVQA: open answers about a document image, scored by ANLS (`metrics.anls`).

    val_v1.0.json: {"data": [{questionId, image ("documents/x.png"), question, answers}]}
    (the test split has no answers: it cannot be scored here).
"""

from __future__ import annotations


from ee_mllm_jax.evaluation import metrics
from ee_mllm_jax.evaluation.benchmarks import base


class DocVQA(base.Benchmark):
  name, title, metric, shown = "docvqa", "DocVQA", "anls", ("anls",)
  synthetic_kind, synthetic_file = "doc", "docvqa_val.json"

  def load(self, path, image_root):
    root, rows, questions = base.image_root(path, image_root), base.Rows(path), []
    for r, where in base.each_row(base.load_json(path, "data")[1], "questionId"):
      qid, image = rows.field(r, "questionId", where, (int, str)), rows.field(r, "image", where)
      answers = rows.answers(r, where)
      questions.append(base.file_question(root, qid, image, rows.field(r, "question", where), answers))
    return questions

  def score(self, q, output):
    return metrics.anls(output, q.answers)

  def record(self, q, output, option_scores):
    return dict(parsed=output, answers=list(q.answers), score=self.score(q, output))

  def summary(self, done):
    return {"anls": base.mean(r["score"] for r in done)}

  def write_synthetic(self, path, rows, root):
    del root
    data = [{"questionId": i, "question": r["question"], "question_types": ["form"], "image": r["image"],
             "docId": i, "ucsf_document_id": f"synthetic{i:06d}", "ucsf_document_page_no": "1",
             "answers": [r["answer"]], "data_split": "val"} for i, r in rows]
    base.write_json(path, {"dataset_name": "docvqa", "dataset_version": "1.0", "dataset_split": "val", "data": data})
