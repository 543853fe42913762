"""Benchmark files in their published formats -> `Question`s.

    textvqa   TextVQA_0.5.1_val.json: {"data": [{question_id, image_id, question, answers (10),
              ocr_tokens?}]}; the image is `train_images/<image_id>.jpg` under the image root (the
              val split's images ship in train_images/), or the record's `image_path` when given
    docvqa    val_v1.0.json: {"data": [{questionId, image ("documents/x.png"), question, answers}]}
    mmbench   MMBench_DEV_EN.tsv: index, question, hint, A..D (E optional), answer, category,
              l2-category, image (base64, or in the circular files the index of the row holding
              it); empty cells and "nan" mean absent; rotations share `index % 1_000_000`
    seedbench SEED-Bench.json: {"question_type": {name: id}, "questions": [{question_id, data_id,
              question_type_id, question, choice_a..choice_d, answer, data_type}]}; only
              data_type "image" questions are read (the video ones need frames)

Image paths are relative to `image_root` (default: the benchmark file's directory). A row that
lacks a field, or has one of the wrong kind, is a `BenchmarkFormatError` naming the row or
question id; images are opened later (missing or corrupt: an error naming the question).
"""

from __future__ import annotations

import base64
import binascii
import csv
import dataclasses
import hashlib
import json
import math
import os
import sys
from typing import Any, Callable

BENCHMARKS = ("textvqa", "docvqa", "mmbench", "seedbench")
LETTERS = "ABCDE"


class BenchmarkFormatError(ValueError):
  """A benchmark file that is not in its format; the message names the file and the row."""


@dataclasses.dataclass(frozen=True)
class Question:
  qid: str  # unique in the file
  image: str | bytes  # a file path, or the encoded image itself (MMBench)
  image_key: str  # equal for questions about the same image (so its prefix is computed once)
  question: str
  answers: tuple[str, ...]  # reference answers; multiple choice: the correct letter
  options: dict[str, str] | None = None  # letter -> text (multiple choice)
  hint: str | None = None
  category: str | None = None  # MMBench category / SEED question type name
  l2_category: str | None = None
  index: int | None = None  # MMBench: the row's index (circular group = index % 1_000_000)
  ocr_tokens: tuple[str, ...] = ()
  image_root: str | None = None  # a file `image` must resolve inside it (`images.contained_path`)


def _absent(value) -> bool:
  """MMBench/pandas conventions: an empty cell, None, NaN or the text "nan"/"none"."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return True
  return isinstance(value, str) and value.strip().lower() in ("", "nan", "none")


class _Rows:
  """Field access that names the file and row on error."""

  def __init__(self, path: str):
    self.path = path

  def fail(self, where: str, message: str):
    raise BenchmarkFormatError(f"{self.path}: {where}: {message}")

  def field(self, row: dict, key: str, where: str, kind: type | tuple = str) -> Any:
    if not isinstance(row, dict):
      self.fail(where, f"expected an object, got {type(row).__name__}")
    if key not in row or row[key] is None:
      self.fail(where, f"has no {key!r} field")
    value = row[key]
    if not isinstance(value, kind) or isinstance(value, bool):
      self.fail(where, f"{key!r} is {type(value).__name__}, expected {getattr(kind, '__name__', kind)}")
    return value


def _load_json(path: str, key: str) -> tuple[dict, list]:
  try:
    with open(path, encoding="utf-8") as f:
      doc = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"benchmark file not found: {path}") from None
  except (ValueError, UnicodeDecodeError) as e:
    raise BenchmarkFormatError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(doc, dict) or not isinstance(doc.get(key), list):
    raise BenchmarkFormatError(f"{path}: expected a JSON object with a {key!r} list")
  return doc, doc[key]


def _unique(questions: list[Question], path: str) -> list[Question]:
  seen = set()
  for q in questions:
    if q.qid in seen:
      raise BenchmarkFormatError(f"{path}: question id {q.qid!r} occurs more than once")
    seen.add(q.qid)
  return questions


def _root(path: str, image_root: str | None) -> str:
  return os.path.abspath(image_root or os.path.dirname(os.path.abspath(path)))


def read_textvqa(path: str, image_root: str | None = None) -> list[Question]:
  root, rows = _root(path, image_root), _Rows(path)
  questions = []
  for i, r in enumerate(_load_json(path, "data")[1]):
    qid = r.get("question_id", f"#{i}") if isinstance(r, dict) else f"#{i}"
    where = f"question {qid} (data[{i}])"
    qid = rows.field(r, "question_id", where, (int, str))
    image_id = rows.field(r, "image_id", where)
    answers = rows.field(r, "answers", where, list)
    if not answers or not all(isinstance(a, str) for a in answers):
      rows.fail(where, "'answers' must be a non-empty list of strings")
    ocr = r.get("ocr_tokens") or []
    if not isinstance(ocr, list) or not all(isinstance(t, str) for t in ocr):
      rows.fail(where, "'ocr_tokens' must be a list of strings")
    image = r.get("image_path") or os.path.join("train_images", f"{image_id}.jpg")
    questions.append(Question(str(qid), os.path.join(root, image), f"file:{image}",
                              rows.field(r, "question", where), tuple(answers), ocr_tokens=tuple(ocr),
                              image_root=root))
  return _unique(questions, path)


def read_docvqa(path: str, image_root: str | None = None) -> list[Question]:
  root, rows = _root(path, image_root), _Rows(path)
  questions = []
  for i, r in enumerate(_load_json(path, "data")[1]):
    qid = r.get("questionId", f"#{i}") if isinstance(r, dict) else f"#{i}"
    where = f"question {qid} (data[{i}])"
    qid = rows.field(r, "questionId", where, (int, str))
    image = rows.field(r, "image", where)
    answers = rows.field(r, "answers", where, list)  # the test split has none: not scorable here
    if not answers or not all(isinstance(a, str) for a in answers):
      rows.fail(where, "'answers' must be a non-empty list of strings")
    questions.append(Question(str(qid), os.path.join(root, image), f"file:{image}",
                              rows.field(r, "question", where), tuple(answers), image_root=root))
  return _unique(questions, path)


def read_mmbench(path: str, image_root: str | None = None) -> list[Question]:
  del image_root  # images are inside the file
  csv.field_size_limit(sys.maxsize)  # base64 images exceed csv's 128 KiB default
  try:
    with open(path, encoding="utf-8", newline="") as f:
      table = list(csv.DictReader(f, delimiter="\t"))
  except FileNotFoundError:
    raise FileNotFoundError(f"benchmark file not found: {path}") from None
  except (UnicodeDecodeError, csv.Error) as e:
    raise BenchmarkFormatError(f"{path} is not a UTF-8 TSV file: {e}") from None
  if not table:
    raise BenchmarkFormatError(f"{path}: no rows")
  missing = [c for c in ("index", "question", "A", "B", "answer", "image") if c not in table[0]]
  if missing:
    raise BenchmarkFormatError(f"{path}: missing columns {missing} (has {list(table[0])})")
  images = {r["index"]: r["image"] for r in table}
  questions = []
  for line, r in enumerate(table, 2):
    where = f"row {line} (index {r['index']!r})"
    if None in r or any(v is None for v in r.values()):
      raise BenchmarkFormatError(f"{path}: {where}: wrong number of columns")
    try:
      index = int(float(r["index"]))
    except ValueError:
      raise BenchmarkFormatError(f"{path}: {where}: index is not a number") from None
    options = {c: r[c] for c in LETTERS if c in r and not _absent(r[c])}
    if len(options) < 2 or list(options) != list(LETTERS[:len(options)]):
      raise BenchmarkFormatError(f"{path}: {where}: options must be A, B[, C, D, E] without gaps, got {list(options)}")
    answer = r["answer"].strip()
    if answer not in options:
      raise BenchmarkFormatError(f"{path}: {where}: answer {answer!r} is not one of the options {list(options)}")
    image = r["image"]
    if len(image) <= 64 and image in images:  # circular files point at the row holding the image
      image = images[image]
    try:
      data = base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError):
      raise BenchmarkFormatError(f"{path}: {where}: the image is not base64") from None
    if not data:
      raise BenchmarkFormatError(f"{path}: {where}: the image is empty")
    questions.append(Question(
        str(index), data, "mmbench:" + hashlib.sha1(data).hexdigest(), r["question"], (answer,), options,
        hint=None if _absent(r.get("hint")) else r["hint"], category=r.get("category") or None,
        l2_category=r.get("l2-category") or None, index=index))
  return _unique(questions, path)


def read_seedbench(path: str, image_root: str | None = None) -> list[Question]:
  root, rows = _root(path, image_root), _Rows(path)
  doc, items = _load_json(path, "questions")
  type_names = {v: k for k, v in (doc.get("question_type") or {}).items()}
  questions = []
  for i, r in enumerate(items):
    qid = r.get("question_id", f"#{i}") if isinstance(r, dict) else f"#{i}"
    where = f"question {qid} (questions[{i}])"
    if rows.field(r, "data_type", where) != "image":
      continue
    options = {c: rows.field(r, f"choice_{c.lower()}", where, (str, int, float)) for c in "ABCD"}
    answer = str(rows.field(r, "answer", where, (str, int))).strip()
    if answer not in options:
      rows.fail(where, f"answer {answer!r} is not one of A-D")
    type_id = rows.field(r, "question_type_id", where, (int, str))
    image = rows.field(r, "data_id", where)
    questions.append(Question(str(rows.field(r, "question_id", where, (int, str))), os.path.join(root, image),
                              f"file:{image}", rows.field(r, "question", where), (answer,),
                              {k: str(v) for k, v in options.items()},
                              category=type_names.get(type_id, type_names.get(str(type_id), str(type_id))),
                              image_root=root))
  return _unique(questions, path)


READERS: dict[str, Callable[..., list[Question]]] = {
    "textvqa": read_textvqa, "docvqa": read_docvqa, "mmbench": read_mmbench, "seedbench": read_seedbench}


def read(benchmark: str, path: str, image_root: str | None = None) -> list[Question]:
  if benchmark not in READERS:
    raise ValueError(f"unknown benchmark {benchmark!r}; known: {list(READERS)}")
  questions = READERS[benchmark](path, image_root)
  if not questions:
    raise BenchmarkFormatError(f"{path}: no {benchmark} questions")
  return questions
