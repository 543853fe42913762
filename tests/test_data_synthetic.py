"""The synthetic dataset: deterministic, learnable only from the image, benchmark files agree."""

import base64
import collections
import csv
import hashlib
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from ee_mllm_jax.data import synthetic
from ee_mllm_jax.data import text as text_lib

SMALL = dict(num_train=60, num_val=80)


def tree_hash(root):
  digest = hashlib.sha256()
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for name in sorted(filenames):
      path = os.path.join(dirpath, name)
      digest.update(os.path.relpath(path, root).encode())
      digest.update(open(path, "rb").read())
  return digest.hexdigest()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return synthetic.generate(str(tmp_path_factory.mktemp("syn") / "a"), seed=3, **SMALL)


def test_same_seed_gives_byte_identical_files(dataset, tmp_path):
  again = synthetic.generate(str(tmp_path / "b"), seed=3, **SMALL)
  other = synthetic.generate(str(tmp_path / "c"), seed=4, **SMALL)
  assert tree_hash(dataset.root) == tree_hash(again.root)
  assert tree_hash(dataset.root) != tree_hash(other.root)


def test_records_are_llava_format_with_existing_images(dataset):
  train, val = (json.load(open(f)) for f in (dataset.train_file, dataset.val_file))
  assert len(train) == 60 and len(val) == 80
  for record in train + val:
    turns = record["conversations"]
    assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
    assert turns[0]["value"].startswith("<image>\n")
    assert sum(t["value"].count("<image>") for t in turns) == 1
    with Image.open(os.path.join(dataset.root, record["image"])) as img:
      assert img.size == (64, 64) and img.mode == "RGB"
  for record in val:
    assert record["answer"] == record["conversations"][1]["value"]
    assert record["question_type"] in synthetic.QUESTION_TYPES and record["question"]
  types = collections.Counter(t for r in train for t in r["question_types"])
  assert set(types) <= set(synthetic.QUESTION_TYPES)


def test_tokenizer_has_the_special_tokens_and_stays_inside_the_vocab(dataset):
  tok = text_lib.load_tokenizer(dataset.tokenizer_file)
  assert tok.get_vocab_size() <= 1024
  for i, token in enumerate(["<unk>", "<s>", "</s>", "<pad>"]):
    assert tok.token_to_id(token) == i
  assert tok.token_to_id("<|im_start|>") is not None and tok.token_to_id("<|im_end|>") is not None
  texts = [t["value"] for r in json.load(open(dataset.train_file)) for t in r["conversations"]]
  texts += ["unseen ünïcode ✓ text 12345 <|im_end|>"]
  for text in texts:
    ids = tok.encode(text, add_special_tokens=False).ids
    assert max(ids) < 1024 and tok.token_to_id("<unk>") not in ids  # byte-level: nothing unknown
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_vocab_size_flag(tmp_path):
  small = synthetic.generate(str(tmp_path / "v"), num_train=20, num_val=4, vocab_size=400)
  assert text_lib.load_tokenizer(small.tokenizer_file).get_vocab_size() <= 400


def test_answers_cannot_be_guessed_from_the_question_text(tmp_path):
  """Per question type the most frequent answer is rare, and even knowing the exact
  question string (train statistics) predicts the val answer barely better than chance."""
  ds = synthetic.generate(str(tmp_path / "p"), num_train=1500, num_val=300, max_turns=1)
  train, val = (json.load(open(f)) for f in (ds.train_file, ds.val_file))
  by_type, by_question = collections.defaultdict(collections.Counter), collections.defaultdict(collections.Counter)
  for r in train:
    kind, question, answer = r["question_types"][0], r["conversations"][0]["value"], r["conversations"][1]["value"]
    by_type[kind][answer] += 1
    by_question[question][answer] += 1
  for kind, answers in by_type.items():
    top = answers.most_common(1)[0][1] / sum(answers.values())
    assert top < 1.0 / len(answers) + 0.15, (kind, answers)
    assert len(answers) >= 4, (kind, answers)
  guess = lambda r: (by_question.get(r["conversations"][0]["value"]) or collections.Counter({"": 1})).most_common(1)[0][0]
  text_only_accuracy = sum(guess(r) == r["answer"] for r in val) / len(val)
  assert text_only_accuracy < 0.35


def test_benchmark_files_parse_and_agree_with_the_val_set(dataset):
  val = {int(r["id"].split("-")[1]): r for r in json.load(open(dataset.val_file))}
  of_type = lambda kind: {i for i, r in val.items() if r["question_type"] == kind}
  files = dataset.benchmarks

  textvqa = json.load(open(files["textvqa"]))["data"]
  assert {q["question_id"] for q in textvqa} == of_type("text")
  for q in textvqa:
    r = val[q["question_id"]]
    assert q["question"] == r["question"] and len(q["answers"]) == 10 and set(q["answers"]) == {r["answer"]}
    assert q["image_id"] == os.path.splitext(os.path.basename(r["image"]))[0]

  docvqa = json.load(open(files["docvqa"]))["data"]
  assert {q["questionId"] for q in docvqa} == of_type("doc")
  for q in docvqa:
    r = val[q["questionId"]]
    assert (q["question"], q["answers"], q["image"]) == (r["question"], [r["answer"]], r["image"])

  with open(files["mmbench"], newline="") as f:
    rows = list(csv.DictReader(f, delimiter="\t"))
  assert {int(row["index"]) for row in rows} == of_type("choice_attribute")
  for row in rows:
    r = val[int(row["index"])]
    assert row["question"] == r["question"] and [row[k] for k in "ABCD"] == r["options"]
    assert row["answer"] == r["answer"] and row[row["answer"]] in r["conversations"][0]["value"]
    assert base64.b64decode(row["image"]) == open(os.path.join(dataset.root, r["image"]), "rb").read()

  seed = json.load(open(files["seedbench"]))
  assert {int(q["question_id"]) for q in seed["questions"]} == of_type("choice_spatial")
  for q in seed["questions"]:
    r = val[int(q["question_id"])]
    assert [q[f"choice_{k}"] for k in "abcd"] == r["options"] and q["answer"] == r["answer"]
    assert q["data_id"] == r["image"] and q["question_type_id"] in seed["question_type"].values()
  assert all(of_type(k) for k in ("text", "doc", "choice_attribute", "choice_spatial"))


def test_ensure_dataset_generates_once_and_refuses_a_different_one(tmp_path):
  root = str(tmp_path / "cache" / "syn")
  ds = synthetic.ensure_dataset(root, num_train=10, num_val=4)
  stamp = os.path.getmtime(ds.train_file)
  assert synthetic.ensure_dataset(root, num_train=10, num_val=4).train_file == ds.train_file
  assert os.path.getmtime(ds.train_file) == stamp
  with pytest.raises(ValueError, match="different synthetic dataset"):
    synthetic.ensure_dataset(root, num_train=11, num_val=4)
  assert os.listdir(tmp_path / "cache") == ["syn"]  # no temporary directories left


def test_command_line_with_a_larger_harder_setting(tmp_path):
  out = tmp_path / "big"
  subprocess.run([sys.executable, "-m", "ee_mllm_jax.data.synthetic", "--out", str(out), "--seed", "1",
                  "--num-train", "12", "--num-val", "40", "--image-size", "336", "--difficulty", "hard"],
                 check=True, capture_output=True)
  val = json.load(open(out / "val.json"))
  with Image.open(out / val[0]["image"]) as img:
    assert img.size == (336, 336)
  assert json.load(open(out / "manifest.json"))["difficulty"] == "hard"


def test_open_questions_file_holds_every_open_val_question_in_textvqa_format(dataset):
  """benchmarks/open_textvqa.json: the questions a model of any mix answers in words (configs/demo.py's
  four types among them), read by eval.py's TextVQA reader with the image each val record names."""
  from ee_mllm_jax.evaluation import benchmarks  # pylint: disable=g-import-not-at-top
  val = {r["id"]: r for r in json.load(open(dataset.val_file))}
  open_ids = {int(i.split("-")[1]) for i, r in val.items() if r["question_type"] in synthetic.OPEN_TYPES}
  assert open_ids and len(open_ids) < len(val)  # the choice questions are left out
  questions = benchmarks.get("textvqa").read(dataset.open_questions, dataset.root)
  assert {int(q.qid) for q in questions} == open_ids
  for q in questions:
    r = val[f"val-{int(q.qid):06d}"]
    image = os.path.join(dataset.root, r["image"])
    assert (q.question, set(q.answers), q.image) == (r["question"], {r["answer"]}, image)


def test_demo_mix_files_lead_to_its_open_questions_and_an_older_dataset_gets_the_file(tmp_path):
  """configs/demo.py's mix writes empty benchmark files: reading one says where its questions are;
  ensure_dataset adds open_textvqa.json to a dataset generated before it existed, changing nothing
  else."""
  from ee_mllm_jax.evaluation import benchmarks  # pylint: disable=g-import-not-at-top
  mix = dict(color=1.0, shape=1.0, count=1.0, position=1.0)
  ds = synthetic.ensure_dataset(str(tmp_path / "demo"), num_train=8, num_val=12, mix=mix)
  with pytest.raises(benchmarks.BenchmarkFormatError,
                     match="no textvqa questions.*configs/demo_bench.py.*open_textvqa"):
    benchmarks.get("textvqa").read(ds.benchmarks["textvqa"], ds.root)
  assert len(benchmarks.get("textvqa").read(ds.open_questions, ds.root)) == 12
  before = tree_hash(ds.root)
  os.remove(ds.open_questions)
  synthetic.ensure_dataset(str(tmp_path / "demo"), num_train=8, num_val=12, mix=mix)
  assert tree_hash(ds.root) == before
