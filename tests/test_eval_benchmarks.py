"""The benchmarks (`evaluation.benchmarks`): the registry, each reader on the synthetic files in
the real formats and on bad files, MMBench's rotations, and ChartQA's relaxed accuracy on
hand-made cases. The runner's properties, on a model, are in test_eval.py."""

import base64
import csv
import io
import json
import os
import re

import pytest
from PIL import Image

from ee_mllm_jax.data import synthetic
from ee_mllm_jax.evaluation import benchmarks, prompts
from ee_mllm_jax.evaluation.benchmarks import chartqa

VOCAB = 384


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  """A small synthetic set with every question type, so every benchmark file it writes has questions."""
  root = str(tmp_path_factory.mktemp("bench") / "synthetic")
  return synthetic.generate(root, num_train=8, num_val=64, image_size=32, vocab_size=VOCAB, max_turns=1,
                            mix=dict(synthetic.DEFAULT_MIX))


def test_the_registry_names_each_benchmark_once():
  assert benchmarks.names() == ("textvqa", "docvqa", "mmbench", "seedbench", "chartqa")
  for name in benchmarks.names():
    b = benchmarks.get(name)
    assert b.name == name and benchmarks.get(b) is b and b.metric in b.shown
  with pytest.raises(ValueError, match=r"unknown benchmark 'vqav2'; known: \['textvqa'"):
    benchmarks.get("vqav2")
  assert [b.name for b in benchmarks.synthetic()] == ["textvqa", "docvqa", "mmbench", "seedbench"]


# ----------------------------------------------------------------------------- readers


def test_readers_take_the_synthetic_files_in_the_real_formats(bench):
  with open(bench.val_file) as f:
    val = json.load(f)
  kinds = {"textvqa": "text", "docvqa": "doc", "mmbench": "choice_attribute", "seedbench": "choice_spatial"}
  for benchmark, kind in kinds.items():
    questions = benchmarks.get(benchmark).read(bench.benchmarks[benchmark], bench.root)
    expected = [r for r in val if r["question_type"] == kind]
    assert len(questions) == len(expected) > 0, benchmark
    for q, r in zip(questions, expected):
      assert q.question == r["question"] and q.qid == str(int(r["id"].split("-")[1]))
      if r.get("options"):
        assert list(q.options.values()) == r["options"] and q.answers == (r["answer"],)
      else:
        assert r["answer"] in q.answers
      if isinstance(q.image, str):
        assert os.path.exists(q.image), q.image
  seed = benchmarks.get("seedbench").read(bench.benchmarks["seedbench"], bench.root)
  assert {q.category for q in seed} <= {"Instances Counting", "Spatial Relation"}


def test_unit_scores_average_to_the_headline_metric(bench):
  """Every synthetic benchmark's questions, answered by a guesser that is right on some and wrong
  on others: the per-unit scores (intervals resample them) average to the headline number. For
  MMBench a unit is a circular group, right only when every rotation is."""
  import random  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax.evaluation import runner  # pylint: disable=g-import-not-at-top
  for name in ("textvqa", "docvqa", "mmbench", "seedbench"):
    b = benchmarks.get(name)
    questions = b.expand(b.read(bench.benchmarks[name], bench.root))
    records = []
    for q in questions:
      unit = q.qid if q.index is None else q.index % 1_000_000
      # right on ~60% of units; MMBench: a group's first rotation on its own draw (some groups half right)
      right = random.Random(f"{name}{unit}").random() < 0.6 or (q.index or 0) >= 1_000_000 and hash(unit) % 2
      output = q.answers[0] if right else "zebra"
      records.append(dict(question_id=q.qid, prompt="", output=output, **b.record(q, output, None)))
    units = b.unit_scores(records)
    headline = runner.score(b, records)[b.metric]
    assert 0 < headline < 1, name  # guard: both right and wrong answers
    assert sum(units.values()) / len(units) == pytest.approx(headline), name
    if name == "mmbench":
      assert len(units) == len({q.index % 1_000_000 for q in questions}) < len(questions)


def test_seed_likelihood_units_average_to_the_likelihood_accuracy(bench):
  """SEED-Bench ranked by option likelihood (its own protocol for LLM-based models): the per-question
  units of "likelihood_accuracy" average to it, and differ from the generated letter's units where
  the two readings disagree; a metric without units is refused by name."""
  from ee_mllm_jax.evaluation import runner  # pylint: disable=g-import-not-at-top
  b = benchmarks.get("seedbench")
  questions = b.read(bench.benchmarks["seedbench"], bench.root)
  assert len(questions) >= 2
  records = []
  for i, q in enumerate(questions):
    letters = list(q.options)
    wrong = next(k for k in letters if k != q.answers[0])
    pick = q.answers[0] if i % 2 == 0 else wrong
    scores = [float(k == pick) for k in letters]  # the likelihood's pick: right on every second
    output = wrong  # the generated letter: never right
    records.append(dict(question_id=q.qid, prompt="", output=output, **b.record(q, output, scores)))
  metrics = runner.score(b, records)
  units = b.unit_scores(records, "likelihood_accuracy")
  assert 0 < metrics["likelihood_accuracy"] < 1 and metrics["accuracy"] == 0
  assert sum(units.values()) / len(units) == pytest.approx(metrics["likelihood_accuracy"])
  letters = b.unit_scores(records)
  assert sum(letters.values()) / len(letters) == pytest.approx(metrics["accuracy"])
  with pytest.raises(ValueError, match="SEED-Bench: no per-unit scores for 'per_question_type'"):
    b.unit_scores(records, "per_question_type")


def _png(colour, size=32) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", (size, size), colour).save(buf, format="PNG")
  return buf.getvalue()


def write_mmbench(path, rows):
  """A TSV in MMBench's columns; rows: dicts with index, question, options (list), answer, image, hint."""
  with open(path, "w", newline="") as f:
    w = csv.writer(f, delimiter="\t", lineterminator="\n")
    w.writerow(["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "l2-category"])
    for r in rows:
      opts = list(r["options"]) + ["nan"] * (4 - len(r["options"]))
      w.writerow([r["index"], r["question"], r.get("hint", "nan"), *opts, r["answer"], r.get("category", "cat"),
                  r["image"], "l2"])


def circular_rows():
  """Two questions, each in 4 rotations (index + k * 1e6); later rotations point at the first
  row's image by its index, as the circular MMBench files do; one has a hint, one 3 options."""
  rows = []
  for base, colour, opts, hint in ((7, (200, 30, 30), ["red", "blue", "green", "pink"], "nan"),
                                   (9, (30, 30, 200), ["blue", "red", "black"], "A picture.")):
    image = base64.b64encode(_png(colour)).decode()
    for k in range(len(opts)):
      rotated = opts[k:] + opts[:k]
      rows.append(dict(index=base + k * 1_000_000, question="What colour is it?", options=rotated,
                       answer="ABCD"[rotated.index(opts[0])], image=image if k == 0 else str(base), hint=hint,
                       category=f"c{base}"))
  return rows


def test_mmbench_reader_rotations_hint_and_image_references(tmp_path):
  path = str(tmp_path / "mmbench.tsv")
  write_mmbench(path, circular_rows())
  qs = benchmarks.get("mmbench").read(path)
  assert len(qs) == 7 and [q.index % 1_000_000 for q in qs] == [7] * 4 + [9] * 3
  assert len({q.image_key for q in qs[:4]}) == 1 and qs[0].image_key != qs[4].image_key
  assert qs[0].hint is None and qs[4].hint == "A picture."  # "nan" is no hint
  assert list(qs[4].options) == ["A", "B", "C"]  # D is "nan": absent
  assert [q.answers[0] for q in qs[:4]] == ["A", "D", "C", "B"]


def test_rotations_are_added_to_single_row_questions_only(tmp_path):
  rows = circular_rows()
  path = str(tmp_path / "mmbench.tsv")
  write_mmbench(path, rows[:4] + [dict(rows[4], index=9)])  # question 7 has its rotations, 9 does not
  qs = benchmarks.get("mmbench").expand(benchmarks.get("mmbench").read(path))
  assert [q.index for q in qs] == [7, 1_000_007, 2_000_007, 3_000_007, 9, 1_000_009, 2_000_009]
  for q in qs[4:]:  # the answer letter follows the correct text
    assert q.options[q.answers[0]] == "blue" and q.image_key == qs[4].image_key
  assert [q.answers[0] for q in qs[4:]] == ["A", "C", "B"]


@pytest.mark.parametrize("benchmark, content, message", [
    ("textvqa", {"data": [{"question_id": 5, "image_id": "x", "question": "q?"}]}, "question 5 (data[0]): has no 'answers'"),
    ("docvqa", {"data": [{"questionId": 3, "image": 4, "question": "q", "answers": ["a"]}]}, "question 3 (data[0]): 'image' is int"),
    ("seedbench", {"questions": [{"question_id": "q1", "data_type": "image", "choice_a": "1", "choice_b": "2",
                                  "choice_c": "3", "choice_d": "4", "answer": "E", "data_id": "x.png",
                                  "question_type_id": 1, "question": "?"}]}, "question q1 (questions[0]): answer 'E'"),
    ("textvqa", {"questions": []}, "with a 'data' list"),
])
def test_bad_benchmark_files_name_the_question(tmp_path, benchmark, content, message):
  path = tmp_path / "bad.json"
  path.write_text(json.dumps(content))
  with pytest.raises(benchmarks.BenchmarkFormatError, match=re.escape(message)):
    benchmarks.get(benchmark).read(str(path))


def test_bad_mmbench_rows_name_the_row(tmp_path):
  rows = circular_rows()
  rows[2]["answer"] = "E"
  path = str(tmp_path / "mmbench.tsv")
  write_mmbench(path, rows)
  with pytest.raises(benchmarks.BenchmarkFormatError, match=r"row 4 \(index '2000007'\): answer 'E'"):
    benchmarks.get("mmbench").read(path)



# ----------------------------------------------------------------------------- ChartQA


@pytest.mark.parametrize("prediction, target, correct", [
    ("12", "12", True),
    ("12.6", "12", True),  # 5% off: still right
    ("105", "100", True), ("95", "100", True), ("106", "100", False), ("12.7", "12", False),
    ("-5", "-5.2", True),  # relative to the reference's magnitude
    ("12%", "0.12", True), ("0.12", "12%", True), ("12", "12%", False),  # a percentage reads as a fraction
    ("0", "0", True), ("0.0", "0", False), ("1", "0", False),  # a zero reference: the text must match
    ("Yes", "yes", True), ("Democrats", "democrats", True),  # text: equal ignoring case
    ("twelve", "12", False), ("1,000", "1000", False),  # not a number: compared as text
    ("yes ", "yes", False),  # no stripping (the runner's outputs are stripped)
])
def test_chartqa_relaxed_accuracy(prediction, target, correct):
  assert chartqa.relaxed_correct(prediction, target) is correct
  q = benchmarks.Question("1", "x.png", "x", "How many?", (target,))
  assert benchmarks.get("chartqa").score(q, prediction) == float(correct)


def test_chartqa_reads_its_files_asks_as_lmms_eval_and_summarises_per_split(tmp_path):
  rows = [{"imgname": "a.png", "query": "What is the peak?", "label": "42"},
          {"imgname": "b.png", "query": "Which party?", "label": "Democrats"}]
  (tmp_path / "test_human.json").write_text(json.dumps(rows))
  (tmp_path / "other.json").write_text(json.dumps({"data": [dict(rows[0], type="augmented_test")]}))
  b = benchmarks.get("chartqa")
  human = b.read(str(tmp_path / "test_human.json"))
  assert [(q.qid, q.question, q.answers, q.category) for q in human] == [
      ("0", "What is the peak?", ("42",), "human_test"), ("1", "Which party?", ("Democrats",), "human_test")]
  assert human[0].image == os.path.join(str(tmp_path), "png", "a.png") and human[0].image_root == str(tmp_path)
  assert b.read(str(tmp_path / "other.json"))[0].category == "augmented_test"
  assert b.message(human[0]) == "What is the peak?\n" + prompts.SHORT_ANSWER  # lmms-eval's default post_prompt
  records = [b.record(q, out, None) for q, out in zip(human, ["41", "republicans"])]
  assert [r["score"] for r in records] == [1.0, 0.0]
  assert b.summary(records) == {"relaxed_accuracy": 0.5, "per_split": {"human_test": 0.5}}
  (tmp_path / "bad.json").write_text(json.dumps([{"imgname": "a.png", "query": "?"}]))
  with pytest.raises(benchmarks.BenchmarkFormatError, match=re.escape("question #0 (data[0]): has no 'label'")):
    b.read(str(tmp_path / "bad.json"))
