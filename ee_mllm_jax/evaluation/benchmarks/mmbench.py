"""MMBench: multiple choice, read by lmms-eval's rules (`metrics.mmbench_option`) and scored by
CircularEval (`metrics.circular_eval`: a question counts only if all its rotations are right).

    MMBench_DEV_EN.tsv: index, question, hint, A..D (E optional), answer, category, l2-category,
    image (base64, or in the circular files the index of the row holding it); empty cells and
    "nan" mean absent; rotations share `index % 1_000_000`.

The circular files carry every rotation as its own row (index + k * 1_000_000, the options
shifted by k, the answer letter moved with them). A question in one row only is expanded here
the same way (`with_rotations`), so CircularEval runs on any MMBench TSV.
"""

from __future__ import annotations

import base64
import binascii
import collections
import csv
import dataclasses
import hashlib
import os
import sys

from ee_mllm_jax.evaluation import metrics
from ee_mllm_jax.evaluation.benchmarks import base

LETTERS = "ABCDE"
COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category",
           "comment", "split"]


def rotate(q: base.Question, k: int) -> base.Question:
  """Rotation k of a multiple-choice question: option i moves to letter (i - k) mod n."""
  letters, texts = list(q.options), list(q.options.values())
  correct = texts[letters.index(q.answers[0])]
  shifted = texts[k:] + texts[:k]
  return dataclasses.replace(q, qid=str(q.index + k * 1_000_000), index=q.index + k * 1_000_000,
                             options=dict(zip(letters, shifted)), answers=(letters[shifted.index(correct)],))


def with_rotations(questions: list[base.Question]) -> list[base.Question]:
  """Every single-row question followed by its other rotations (one per option); questions that
  already have rotations are left as they are."""
  sizes = collections.Counter(q.index % 1_000_000 for q in questions)
  out = []
  for q in questions:
    out.append(q)
    if sizes[q.index % 1_000_000] == 1:
      out += [rotate(q, k) for k in range(1, len(q.options))]
  return out


def _number(text: str) -> int | None:
  try:
    return int(float(text))
  except ValueError:
    return None


def _base64(text: str) -> bytes | None:
  try:
    return base64.b64decode(text, validate=True)
  except (binascii.Error, ValueError):
    return None


class MMBench(base.Benchmark):
  name, title, metric = "mmbench", "MMBench", "circular_accuracy"
  shown = ("circular_accuracy", "row_accuracy")
  breakdowns = (("per_category", "category"), ("per_l2_category", "l2-category"))
  synthetic_kind, synthetic_file = "choice_attribute", "mmbench_dev.tsv"

  def load(self, path, image_root):
    del image_root  # images are inside the file
    csv.field_size_limit(sys.maxsize)  # base64 images exceed csv's 128 KiB default
    try:
      with open(path, encoding="utf-8", newline="") as f:
        table = list(csv.DictReader(f, delimiter="\t"))
    except FileNotFoundError:
      raise FileNotFoundError(f"benchmark file not found: {path}") from None
    except (UnicodeDecodeError, csv.Error) as e:
      raise base.BenchmarkFormatError(f"{path} is not a UTF-8 TSV file: {e}") from None
    if not table:
      raise base.BenchmarkFormatError(f"{path}: no rows")
    missing = [c for c in ("index", "question", "A", "B", "answer", "image") if c not in table[0]]
    if missing:
      raise base.BenchmarkFormatError(f"{path}: missing columns {missing} (has {list(table[0])})")
    images = {r["index"]: r["image"] for r in table}
    return [self._row(path, line, r, images) for line, r in enumerate(table, 2)]

  def _row(self, path, line, r, images) -> base.Question:
    fail = lambda message: base.Rows(path).fail(f"row {line} (index {r['index']!r})", message)
    if None in r or any(v is None for v in r.values()):
      fail("wrong number of columns")
    index = _number(r["index"])
    if index is None:
      fail("index is not a number")
    options = {c: r[c] for c in LETTERS if c in r and not base.absent(r[c])}
    if len(options) < 2 or list(options) != list(LETTERS[:len(options)]):
      fail(f"options must be A, B[, C, D, E] without gaps, got {list(options)}")
    answer = r["answer"].strip()
    if answer not in options:
      fail(f"answer {answer!r} is not one of the options {list(options)}")
    image = r["image"]
    if len(image) <= 64 and image in images:  # circular files point at the row holding the image
      image = images[image]
    data = _base64(image)
    if data is None:
      fail("the image is not base64")
    if not data:
      fail("the image is empty")
    return base.Question(
        str(index), data, "mmbench:" + hashlib.sha1(data).hexdigest(), r["question"], (answer,), options,
        hint=None if base.absent(r.get("hint")) else r["hint"], category=r.get("category") or None,
        l2_category=r.get("l2-category") or None, index=index)

  def expand(self, questions):
    return with_rotations(questions)

  def score(self, q, output):
    return float(metrics.mmbench_option(output, q.options)[0] == q.answers[0])

  def record(self, q, output, option_scores):
    parsed, method = metrics.mmbench_option(output, q.options)
    return dict(parsed=parsed, parse_method=method, answer=q.answers[0], correct=parsed == q.answers[0],
                index=q.index, category=q.category, l2_category=q.l2_category, options=q.options)

  def unit_scores(self, done, metric=None):
    """One unit per circular group (a question and its rotations): right only if every rotation is."""
    self.check_unit_metric(metric)
    groups = metrics.circular_groups(r["index"] for r in done)
    return {str(g): float(all(done[m]["correct"] for m in members)) for g, members in groups.items()}

  def summary(self, done):
    out = metrics.circular_eval(done)
    out["unparseable"] = sum(r["parsed"] is None for r in done)
    # Rows lmms-eval's rules cannot read, where it would ask its GPT judge (a heuristic here).
    out["needed_judge"] = sum(r.get("parse_method", "rule") != "rule" for r in done)
    return out

  def write_synthetic(self, path, rows, root):
    with open(path, "w", newline="") as f:
      writer = csv.writer(f, delimiter="\t", lineterminator="\n")
      writer.writerow(COLUMNS)
      for i, r in rows:
        with open(os.path.join(root, r["image"]), "rb") as img:
          image_b64 = base64.b64encode(img.read()).decode()
        writer.writerow([i, r["question"], "", *r["options"], r["answer"], r["category"], image_b64,
                         "synthetic", "fine-grained_perception (instance-level)", "", "dev"])
