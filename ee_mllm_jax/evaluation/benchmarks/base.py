"""What a benchmark is, in one object: its file format, its prompt, its per-question record, its
score and its summary (one file per benchmark beside this one, a registry in `__init__`).

    bench = benchmarks.get("docvqa")
    questions = bench.expand(bench.read("val_v1.0.json", image_root))   # MMBench: + rotations
    bench.message(q, style)                 # the user message, after "<image>\\n"
    bench.record(q, output, option_scores)  # the benchmark's fields of one predictions.jsonl line
    bench.summary(records)                  # its metrics.json fields over the scored records
    bench.metric                            # the headline number's key in metrics.json

A benchmark the synthetic dataset writes names the val question type it takes
(`synthetic_kind`) and its file (`synthetic_file`), and writes that file (`write_synthetic`).

Shared here: `Question`, `BenchmarkFormatError`, and the checks readers make of their rows.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Sequence

from ee_mllm_jax.evaluation import prompts


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
  category: str | None = None  # MMBench category / SEED question type name / ChartQA split
  l2_category: str | None = None
  index: int | None = None  # MMBench: the row's index (circular group = index % 1_000_000)
  ocr_tokens: tuple[str, ...] = ()
  image_root: str | None = None  # a file `image` must resolve inside it (`images.contained_path`)


class Benchmark:
  """One benchmark. Subclasses set the class attributes and define `load`, `record`, `summary`."""

  name: str = ""  # the registry's key, eval.py's --benchmark
  title: str = ""  # as tables name it
  metric: str = ""  # the headline metric (a metrics.json key)
  shown: tuple[str, ...] = ()  # metrics.json keys the terminal summary prints, in order (headline first)
  breakdowns: tuple[tuple[str, str], ...] = ()  # (metrics.json key of a {name: score} dict, its label)
  ranks_options: bool = False  # multiple choice whose options are also ranked by likelihood (SEED)
  synthetic_kind: str | None = None  # the synthetic val question type its file holds (None: not written)
  synthetic_file: str | None = None  # its file's name under the synthetic dataset's benchmarks/

  # ------------------------------------------------------------------------ reading

  def load(self, path: str, image_root: str | None) -> list[Question]:
    raise NotImplementedError

  def read(self, path: str, image_root: str | None = None) -> list[Question]:
    """The file's questions; a file without any, or with a question id twice, is refused."""
    questions = self.load(path, image_root)
    if not questions:
      hint = (f" (a synthetic dataset's {self.synthetic_file} holds its {self.synthetic_kind!r} questions, none where "
              "the mix has none, as configs/demo.py's: train configs/demo_bench.py for them, or score the demo's "
              "open questions, benchmarks/open_textvqa.json)") if self.synthetic_file else ""
      raise BenchmarkFormatError(f"{path}: no {self.name} questions{hint}")
    seen = set()
    for q in questions:
      if q.qid in seen:
        raise BenchmarkFormatError(f"{path}: question id {q.qid!r} occurs more than once")
      seen.add(q.qid)
    return questions

  def expand(self, questions: list[Question]) -> list[Question]:
    """The questions as they are run (MMBench adds circular rotations); by default as read."""
    return questions

  # ------------------------------------------------------------------------ asking

  def context(self, q: Question, style: prompts.PromptStyle) -> list[str]:
    """Lines between an open question and its answer-style line (TextVQA: its OCR tokens)."""
    del q, style
    return []

  def message(self, q: Question, style: prompts.PromptStyle = prompts.PromptStyle(), *,
              with_options: bool = True) -> str:
    """The user message (after "<image>\\n") for `q`; without options for likelihood ranking."""
    options = q.options if with_options else None
    return prompts.user_message(q.question, options, hint=q.hint, style=style,
                                context=() if options else self.context(q, style))

  # ------------------------------------------------------------------------ scoring

  def score(self, q: Question, output: str) -> float:
    """The score of one answer (1.0 / 0.0 where it is right or wrong)."""
    raise NotImplementedError

  def record(self, q: Question, output: str, option_scores: list[float] | None) -> dict[str, Any]:
    """The benchmark's fields of one predictions.jsonl line (after question_id, prompt, output)."""
    raise NotImplementedError

  def summary(self, done: Sequence[dict]) -> dict[str, Any]:
    """metrics.json's benchmark fields from the records of the questions that ran."""
    raise NotImplementedError

  def unit_scores(self, done: Sequence[dict], metric: str | None = None) -> dict[str, float]:
    """{scoring unit: score in [0, 1]} whose mean is `metric` (a metrics.json key; None: the
    headline metric): the unit of resampling for intervals over questions
    (`evaluation.intervals`). By default a question, scored by its record's "score" (or "correct")."""
    self.check_unit_metric(metric)
    return {str(r["question_id"]): float(r["score"] if "score" in r else r["correct"]) for r in done}

  def check_unit_metric(self, metric: str | None, *others: str):
    """Refuses a `metric` whose units this benchmark cannot give (the headline's and `others`)."""
    if metric not in (None, self.metric, *others):
      raise ValueError(f"{self.title}: no per-unit scores for {metric!r} (it has them for "
                       f"{', '.join(repr(m) for m in (self.metric, *others))})")

  def metric_lines(self, metrics: dict[str, Any]) -> list[str]:
    """The terminal summary's lines of `metrics`: the shown numbers, then the breakdowns."""
    lines = [f"  {key:<22} {100 * metrics[key]:6.2f}" for key in self.shown if key in metrics]
    if "unparseable" in metrics:
      lines.append(f"  {'unparseable outputs':<22} {metrics['unparseable']:6d}")
    if "needed_judge" in metrics:
      lines.append(f"  {'needed GPT judge':<22} {metrics['needed_judge']:6d}  (lmms-eval's; read by a heuristic here)")
    for key, label in self.breakdowns:
      for name, value in (metrics.get(key) or {}).items():
        lines.append(f"    {label:<18} {name:<44} {100 * value:6.2f}")
    return lines

  # ------------------------------------------------------------------------ synthetic data

  def write_synthetic(self, path: str, rows: list[tuple[int, dict]], root: str):
    """Writes `rows` ((id, val record) of `synthetic_kind`) as this benchmark's file at `path`;
    image paths in the records are relative to the dataset's `root`."""
    raise NotImplementedError(f"the synthetic dataset does not write {self.name}")


def mean(values) -> float:
  """The mean, 0 for none (an empty run)."""
  values = list(values)
  return sum(values) / max(len(values), 1)


def write_json(path: str, doc: dict):
  with open(path, "w") as f:
    json.dump(doc, f, indent=1)


# ----------------------------------------------------------------------------- reading rows


def absent(value) -> bool:
  """MMBench/pandas conventions: an empty cell, None, NaN or the text "nan"/"none"."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return True
  return isinstance(value, str) and value.strip().lower() in ("", "nan", "none")


class Rows:
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

  def answers(self, row: dict, where: str) -> tuple[str, ...]:
    answers = self.field(row, "answers", where, list)
    if not answers or not all(isinstance(a, str) for a in answers):
      self.fail(where, "'answers' must be a non-empty list of strings")
    return tuple(answers)


def load_json(path: str, key: str | None) -> tuple[Any, list]:
  """(the document, its `key` list); key None: the document is the list, or holds it as "data"."""
  try:
    with open(path, encoding="utf-8") as f:
      doc = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"benchmark file not found: {path}") from None
  except (ValueError, UnicodeDecodeError) as e:
    raise BenchmarkFormatError(f"{path} is not valid JSON: {e}") from None
  if key is None:
    if isinstance(doc, list):
      return doc, doc
    key = "data"
  if not isinstance(doc, dict) or not isinstance(doc.get(key), list):
    raise BenchmarkFormatError(f"{path}: expected a JSON object with a {key!r} list")
  return doc, doc[key]


def image_root(path: str, root: str | None) -> str:
  """The directory image paths are relative to: `root`, else the benchmark file's."""
  return os.path.abspath(root or os.path.dirname(os.path.abspath(path)))


def each_row(items: list, id_key: str, listed: str = "data"):
  """(row, "question ID (listed[i])" for error messages) for each row; ID is "#i" where it has none."""
  for i, row in enumerate(items):
    qid = row.get(id_key, f"#{i}") if isinstance(row, dict) else f"#{i}"
    yield row, f"question {qid} ({listed}[{i}])"


def file_question(root: str, qid, image: str, question: str, answers: tuple[str, ...], **fields) -> Question:
  """A question about the image file `image` (relative to, and kept inside, `root`)."""
  return Question(str(qid), os.path.join(root, image), f"file:{image}", question, answers, image_root=root, **fields)
