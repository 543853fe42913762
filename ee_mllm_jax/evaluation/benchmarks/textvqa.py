"""TextVQA: open answers about text in the image, scored by VQA accuracy (`metrics.vqa_accuracy`).

    TextVQA_0.5.1_val.json: {"data": [{question_id, image_id, question, answers (10), ocr_tokens?}]};
    the image is `train_images/<image_id>.jpg` under the image root (the val split's images ship
    in train_images/), or the record's `image_path` when given.
"""

from __future__ import annotations

import os

from ee_mllm_jax.evaluation import metrics
from ee_mllm_jax.evaluation.benchmarks import base


class TextVQA(base.Benchmark):
  name, title, metric, shown = "textvqa", "TextVQA", "accuracy", ("accuracy",)
  synthetic_kind, synthetic_file = "text", "textvqa_val.json"

  def load(self, path, image_root):
    root, rows = base.image_root(path, image_root), base.Rows(path)
    questions = []
    for r, where in base.each_row(base.load_json(path, "data")[1], "question_id"):
      qid = rows.field(r, "question_id", where, (int, str))
      image_id = rows.field(r, "image_id", where)
      answers = rows.answers(r, where)
      ocr = r.get("ocr_tokens") or []
      if not isinstance(ocr, list) or not all(isinstance(t, str) for t in ocr):
        rows.fail(where, "'ocr_tokens' must be a list of strings")
      image = r.get("image_path") or os.path.join("train_images", f"{image_id}.jpg")
      questions.append(base.file_question(root, qid, image, rows.field(r, "question", where), answers,
                                          ocr_tokens=tuple(ocr)))
    return questions

  def context(self, q, style):
    """The file's OCR tokens, as LLaVA's textvqa eval gives them."""
    return ["Reference OCR token: " + ", ".join(q.ocr_tokens)] if style.ocr_tokens and q.ocr_tokens else []

  def score(self, q, output):
    return metrics.vqa_accuracy(output, q.answers)

  def record(self, q, output, option_scores):
    return dict(parsed=metrics.normalize_vqa_answer(output), answers=list(q.answers), score=self.score(q, output))

  def summary(self, done):
    return {"accuracy": base.mean(r["score"] for r in done)}

  def write_synthetic(self, path, rows, root):
    del root
    data = [{"question_id": i, "question": r["question"], "image_id": os.path.splitext(os.path.basename(r["image"]))[0],
             "image_path": r["image"], "image_width": None, "image_height": None, "image_classes": [],
             "answers": [r["answer"]] * 10, "question_tokens": r["question"].lower().rstrip("?").split(),
             "set_name": "val", "flickr_original_url": "", "flickr_300k_url": ""} for i, r in rows]
    base.write_json(path, {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1",
                           "data": data})
