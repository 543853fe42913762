"""Batch prediction on any question file (`eval.py --predict`): its reader, and `QuestionFile`, an
unscored benchmark object the runner takes like any other (its batching, prefix reuse, progress
bar, resume and SIGTERM), whose record is the question and whose summary is only counts. It is
not in the benchmark registry (`benchmarks.names()`): it has no metric and no fixed format name.

Two formats, told apart by the first character of the file:

    JSON (a list, as LLaVA's training files): {"id", "image": "a.jpg" | ["a.jpg"],
        "conversations": [{"from": "human", "value": "<image>\\nWhat is ...?"}, ...]}
        The first human turn is the question (later turns and the answers are ignored).
    JSON Lines (as LLaVA's model_vqa.py question files): {"question_id": 7, "image": "a.jpg",
        "text": "What is ...?"}; "id" for "question_id", "images": [...] for "image", "question"
        for "text" are read too.

Image paths are relative to --image-root (default: the question file's directory), and stay
inside it. The "<image>" marker is dropped from a question: the image goes before the question,
as LLaVA's prompts put it. Each question is about one image (the model's prompts hold one). Ids
(strings or integers) are unique in the file and written as strings. A record that breaks these
rules is a BenchmarkFormatError naming the file and the line (JSON Lines) or record (JSON).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from ee_mllm_jax.data.text import IMAGE_PLACEHOLDER
from ee_mllm_jax.evaluation import prompts
from ee_mllm_jax.evaluation.benchmarks import base
from ee_mllm_jax.evaluation.benchmarks.base import Benchmark, BenchmarkFormatError, Question

_HUMAN = ("human", "user")


def _records(path: str) -> list[tuple[str, Any]]:
  """[(where, record)] of a JSON list ("record i") or a JSON Lines file ("line n", blank lines skipped)."""
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except FileNotFoundError:
    raise FileNotFoundError(f"question file not found: {path}") from None
  except UnicodeDecodeError as e:
    raise BenchmarkFormatError(f"{path}: not UTF-8 text: {e}") from None
  if text.lstrip().startswith("["):
    try:
      doc = json.loads(text)
    except ValueError as e:
      raise BenchmarkFormatError(f"{path} is not valid JSON: {e}") from None
    return [(f"record {i}", row) for i, row in enumerate(doc)]
  out = []
  for n, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      out.append((f"line {n}", json.loads(line)))
    except json.JSONDecodeError as e:
      raise BenchmarkFormatError(f"{path}: line {n}: not valid JSON ({e.msg}, column {e.colno}); expected a JSON "
                                 "list of records or one JSON object per line") from None
  return out


def _one_of(rows: base.Rows, row: dict, keys: Sequence[str], where: str, kind: type | tuple = str):
  """The value of the first of `keys` that `row` has (checked as `kind`), or an error naming them."""
  for key in keys:
    if row.get(key) is not None:
      return rows.field(row, key, where, kind)
  rows.fail(where, "has no " + " or ".join(repr(k) for k in keys) + " field")


def _question(rows: base.Rows, row: dict, where: str) -> str:
  if "conversations" in row:
    turns = rows.field(row, "conversations", where, list)
    human = [t for t in turns if isinstance(t, dict) and t.get("from") in _HUMAN]
    if not human:
      rows.fail(where, "its 'conversations' have no human turn ({\"from\": \"human\", \"value\": ...})")
    text = rows.field(human[0], "value", f"{where}, its first human turn")
  else:
    text = _one_of(rows, row, ("question", "text"), where)
  text = text.replace(IMAGE_PLACEHOLDER, "").strip()
  if not text:
    rows.fail(where, "its question is empty")
  return text


def _image(rows: base.Rows, row: dict, where: str) -> str:
  images = _one_of(rows, row, ("image", "images"), where, (str, list))
  images = [images] if isinstance(images, str) else images
  if not all(isinstance(x, str) and x for x in images):
    rows.fail(where, "image paths must be non-empty strings")
  if len(images) != 1:
    rows.fail(where, f"has {len(images)} images; each question is about one image (the model's prompt holds one)")
  return images[0]


def read(path: str, image_root: str | None = None) -> list[Question]:
  """The questions of a question file (module docstring), in file order."""
  rows, root, out, seen = base.Rows(path), base.image_root(path, image_root), [], {}
  for where, row in _records(path):
    if not isinstance(row, dict):
      rows.fail(where, f"expected an object, got {type(row).__name__}")
    qid = str(_one_of(rows, row, ("question_id", "id"), where, (str, int)))
    if qid in seen:
      rows.fail(where, f"question id {qid!r} occurs more than once (first at {seen[qid]})")
    seen[qid] = where
    out.append(base.file_question(root, qid, _image(rows, row, where), _question(rows, row, where), ()))
  if not out:
    raise BenchmarkFormatError(f"{path}: no questions")
  return out


class QuestionFile(Benchmark):
  """A question file's questions asked as they are written: no answer-style line, no score."""

  name = "questions"
  title = "Question file"

  def load(self, path: str, image_root: str | None) -> list[Question]:
    return read(path, image_root)

  def message(self, q: Question, style: prompts.PromptStyle = prompts.PromptStyle(), *,
              with_options: bool = True) -> str:
    del style, with_options
    return q.question  # the user's words, as `eval.py --image --question` asks them

  def record(self, q: Question, output: str, option_scores: list[float] | None) -> dict[str, Any]:
    del output, option_scores
    return dict(question=q.question, image=os.path.relpath(q.image, q.image_root))

  def summary(self, done: Sequence[dict]) -> dict[str, Any]:
    return {}

  def unit_scores(self, done: Sequence[dict], metric: str | None = None) -> dict[str, float]:
    raise NotImplementedError("a question file has no scores")
