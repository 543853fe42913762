"""A synthetic visual-QA dataset that a small model can learn and text alone cannot answer.

    python -m ee_mllm_jax.data.synthetic --out DIR [--seed 0 --num-train 4000 --image-size 64 ...]

Writes (same arguments -> byte-identical files):

    DIR/images/{train,val}/NNNNNN.png   Pillow-drawn images
    DIR/train.json, DIR/val.json        LLaVA format; val records also carry `question`,
                                        `answer`, `question_type` (and `options` for choices);
                                        train records carry `question_types` per human turn
    DIR/tokenizer.json                  byte-level BPE trained on the corpus (<unk>=0, <s>=1,
                                        </s>=2, <pad>=3, <|im_start|>, <|im_end|>, <image>)
    DIR/benchmarks/                     the val questions in real benchmark formats, written by
                                        the benchmarks (`evaluation.benchmarks`, each one's
                                        `synthetic_kind` and `synthetic_file`): textvqa_val.json
        (text), docvqa_val.json (doc), mmbench_dev.tsv (choice_attribute), seed_bench.json
        (choice_spatial); ids are the val record's number. A file whose question type the mix
        lacks holds a header and no question (configs/demo.py's four: configs/demo_bench.py
        trains on all types). open_textvqa.json: every open val question (colour, shape, count,
        position, text, doc) in TextVQA's format, the questions any mix's model can answer
    DIR/manifest.json                   the arguments (ensure_dataset compares them)

The scenes and their questions are drawn in `data.scenes`. Question types and their answers (every answer is drawn uniformly, independently of the
question's wording, so the best text-only guess -- the answer prior -- is 1/|answers|):

    color       "What colour is the square?"                  one of the level's colours
    shape       "What shape is the red object?"                one of the level's shapes
    count       "How many circles are there?"                  1..max_count
    position    "Where is the red circle relative to ...?"     left/right/above/below
    choice_*    the same, as A-D multiple choice (MMBench/SEED) the correct letter
    text        "What does the sign say?"                     a word on a sign (TextVQA-like)
    doc         "What is the room on the form?"                a field value (DocVQA-like)

The default (64 px, "easy": big objects on a 2x2 grid, 6 colours, 4 shapes, counts 1-4,
short words from 8, doc values from 8) is meant for the `demo` model on a CPU; larger
images and "medium"/"hard" add colours, shapes, distractors, counts and vocabulary.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import inspect
import json
import os
import shutil
import tempfile

import numpy as np
import tokenizers

from ee_mllm_jax.data.scenes import LETTERS, LEVELS, Question, SceneMaker  # noqa: F401
from ee_mllm_jax.evaluation import benchmarks, prompts

QUESTION_TYPES = ("color", "shape", "count", "position", "choice_attribute", "choice_spatial", "text", "doc")
OPEN_TYPES = ("color", "shape", "count", "position", "text", "doc")  # answered in words, not a letter
OPEN_FILE = "benchmarks/open_textvqa.json"
DEFAULT_MIX = {"color": 1.0, "shape": 1.0, "count": 1.0, "position": 1.0, "choice_attribute": 0.5,
               "choice_spatial": 0.5, "text": 0.5, "doc": 0.5}
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<image>"]
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class SyntheticDataset:
  """Paths of a generated dataset."""

  root: str

  def path(self, name: str) -> str:
    return os.path.join(self.root, name)

  @property
  def train_file(self) -> str:
    return self.path("train.json")

  @property
  def val_file(self) -> str:
    return self.path("val.json")

  @property
  def tokenizer_file(self) -> str:
    return self.path("tokenizer.json")

  @property
  def benchmarks(self) -> dict[str, str]:
    """{benchmark name: its file} for the benchmarks the dataset writes (`benchmarks.synthetic()`)."""
    return {b.name: self.path(f"benchmarks/{b.synthetic_file}") for b in benchmarks.synthetic()}

  @property
  def open_questions(self) -> str:
    """The open val questions in TextVQA's format (`eval.py --benchmark textvqa --data ...`)."""
    return self.path(OPEN_FILE)

  def data_config(self, model_config, **fields):
    """A DataConfig for this dataset and a ModelConfig (image size, P, mean/std)."""
    from ee_mllm_jax.data.pipeline import DataConfig  # pylint: disable=g-import-not-at-top
    return DataConfig.for_model(model_config, train_file=self.train_file, val_file=self.val_file,
                                tokenizer_file=self.tokenizer_file, **fields)


# The questions as the dataset asks them: LLaVA-1.5's layout, no answer-style line for open ones.
PROMPT_STYLE = prompts.PromptStyle(short_answer="")


# ----------------------------------------------------------------------------- records


def _human_value(q: Question, with_image: bool) -> str:
  options = dict(zip(LETTERS, q.options)) if q.options else None
  return ("<image>\n" if with_image else "") + prompts.user_message(q.question, options, style=PROMPT_STYLE)


def _make_split(root, split, count, seed, maker, mix, max_turns):
  """Draws `count` records; each from its own generator, so a record does not depend on
  how many were asked for."""
  kinds = list(mix)
  weights = np.asarray([mix[k] for k in kinds], np.float64)
  weights /= weights.sum()
  os.makedirs(os.path.join(root, "images", split), exist_ok=True)
  records = []
  for index in range(count):
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, index])  # record-local
    kind = kinds[rng.choice(len(kinds), p=weights)]
    turns = int(rng.integers(1, max_turns + 1)) if split == "train" else 1
    image, questions = maker.make(rng, kind, turns)
    image_path = f"images/{split}/{index:06d}.png"
    image.save(os.path.join(root, image_path), optimize=False)
    conversations = []
    for k, q in enumerate(questions):
      conversations += [{"from": "human", "value": _human_value(q, k == 0)}, {"from": "gpt", "value": q.answer}]
    record = {"id": f"{split}-{index:06d}", "image": image_path, "conversations": conversations}
    if split == "train":
      record["question_types"] = [q.kind for q in questions]
    else:
      q = questions[0]
      record.update(question=q.question, answer=q.answer, question_type=q.kind)
      if q.options:
        record.update(options=q.options, category=q.category)
    records.append(record)
  with open(os.path.join(root, f"{split}.json"), "w") as f:
    json.dump(records, f, indent=1)
  return records


# The vicuna system prompt the tokenizer corpus has always held (conv_llava_v1's). text.VICUNA_SYSTEM
# is now LLaVA-1.5's conv_vicuna_v1 ("curious user ... the user's questions"); the corpus keeps
# this one so that generated datasets keep their exact tokenizer (the same merges either way, but
# five ids would move) and the results and caches made with them stay valid.
_CORPUS_VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                         "The assistant gives helpful, detailed, and polite answers to the human's questions.")


def _train_tokenizer(path, records, vocab_size):
  from ee_mllm_jax.data import text as text_lib  # pylint: disable=g-import-not-at-top
  if vocab_size < 256 + len(SPECIAL_TOKENS) + 64:
    raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level BPE")
  corpus = [_CORPUS_VICUNA_SYSTEM, text_lib.CHATML_SYSTEM, "USER: ASSISTANT: system\nuser\nassistant\n",
            prompts.CHOOSE_LETTER] + [t["value"].replace("<image>", "") for r in records for t in r["conversations"]]
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(corpus, trainer=trainer)
  tok.save(path)


def _write_benchmarks(root, records):
  """Each benchmark's file (`benchmarks.synthetic()`) from the val records of its question type."""
  os.makedirs(os.path.join(root, "benchmarks"), exist_ok=True)
  for bench in benchmarks.synthetic():
    rows = [(int(r["id"].split("-")[1]), r) for r in records if r["question_type"] == bench.synthetic_kind]
    bench.write_synthetic(os.path.join(root, "benchmarks", bench.synthetic_file), rows, root)
  _write_open_questions(root, records)


def _write_open_questions(root, records):
  """OPEN_FILE: the val questions of every open type, in TextVQA's format (the model is asked in
  words and scored by VQA accuracy, here exact match after normalisation: 10 equal answers)."""
  rows = [(int(r["id"].split("-")[1]), r) for r in records if r["question_type"] in OPEN_TYPES]
  path = os.path.join(root, OPEN_FILE)
  tmp = f"{path}.{os.getpid()}.tmp"  # renamed into place: processes of one job may add it at once
  benchmarks.get("textvqa").write_synthetic(tmp, rows, root)
  os.replace(tmp, path)


def generate(out_dir: str, *, seed: int = 0, num_train: int = 4000, num_val: int = 400,
             image_size: int = 64, difficulty: str = "easy", vocab_size: int = 1024,
             max_turns: int = 3, mix: dict[str, float] | None = None) -> SyntheticDataset:
  """Writes the dataset into `out_dir` (see the module docstring); deterministic."""
  params = _manifest(locals())
  maker = SceneMaker(image_size, difficulty)
  os.makedirs(out_dir, exist_ok=True)
  train = _make_split(out_dir, "train", num_train, seed, maker, params["mix"], max_turns)
  val = _make_split(out_dir, "val", num_val, seed, maker, params["mix"], max_turns)
  _train_tokenizer(os.path.join(out_dir, "tokenizer.json"), train + val, vocab_size)
  _write_benchmarks(out_dir, val)
  with open(os.path.join(out_dir, "manifest.json"), "w") as f:
    json.dump(params, f, indent=1, sort_keys=True)
  return SyntheticDataset(out_dir)


def _manifest(arguments) -> dict:
  """generate()'s arguments (validated, mix resolved) as written to manifest.json."""
  mix = dict(DEFAULT_MIX if arguments["mix"] is None else arguments["mix"])
  if set(mix) - set(QUESTION_TYPES) or not any(v > 0 for v in mix.values()):
    raise ValueError(f"mix needs positive weights over {QUESTION_TYPES}, got {mix}")
  params = {k: v for k, v in arguments.items() if k != "out_dir"}
  params["mix"] = {k: float(v) for k, v in sorted(mix.items()) if v > 0}
  return {"format_version": FORMAT_VERSION, **params}


def answer_prior(train_records: list[dict], val_records: list[dict]) -> float | None:
  """Val accuracy of always giving, per question type, the most frequent train answer: what a
  model that ignores the image can reach (None when the records carry no question types)."""
  counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for record in train_records:
    turns = record.get("conversations") or []
    answers = [t["value"].strip() for t in turns if isinstance(t, dict) and t.get("from") in ("gpt", "assistant")]
    for kind, answer in zip(record.get("question_types", []), answers):
      counts[kind][answer] += 1
  scored = [r for r in val_records if isinstance(r, dict) and "answer" in r and "question_type" in r]
  if not scored or not counts:
    return None
  best = {kind: c.most_common(1)[0][0] for kind, c in counts.items()}
  return sum(best.get(r["question_type"]) == r["answer"] for r in scored) / len(scored)


def ensure_dataset(out_dir: str, **kwargs) -> SyntheticDataset:
  """`generate(out_dir, **kwargs)` unless `out_dir` already holds exactly that dataset.

  Generates into a temporary sibling directory and renames it into place, so concurrent
  callers (several processes of one job) never see a half-written dataset.
  """
  arguments = inspect.signature(generate).bind(out_dir, **kwargs)
  arguments.apply_defaults()
  wanted = _manifest(arguments.arguments)
  manifest = os.path.join(out_dir, "manifest.json")
  if os.path.exists(manifest):
    with open(manifest) as f:
      found = json.load(f)
    if found != wanted:
      raise ValueError(f"{out_dir} holds a different synthetic dataset ({found}); wanted {wanted}. "
                       "Delete it or choose another directory.")
    dataset = SyntheticDataset(out_dir)
    if not os.path.exists(dataset.open_questions):  # generated before that file was written
      with open(dataset.val_file) as f:
        _write_open_questions(out_dir, json.load(f))
    return dataset
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise ValueError(f"{out_dir} exists, is not empty and has no manifest.json")
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".synthetic-", dir=parent)
  try:
    generate(tmp, **kwargs)
    if os.path.isdir(out_dir):
      os.rmdir(out_dir)  # empty
    os.rename(tmp, out_dir)
  except OSError:
    if not os.path.exists(manifest):  # not another process winning the race
      raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return SyntheticDataset(out_dir)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--num-train", type=int, default=4000)
  parser.add_argument("--num-val", type=int, default=400)
  parser.add_argument("--image-size", type=int, default=64)
  parser.add_argument("--difficulty", choices=list(LEVELS), default="easy")
  parser.add_argument("--vocab-size", type=int, default=1024)
  parser.add_argument("--max-turns", type=int, default=3, help="questions per train image, at most")
  parser.add_argument("--mix", default=None, help="question-type weights, e.g. color=1,count=2,text=0")
  args = parser.parse_args(argv)
  mix = None
  if args.mix:
    mix = {**DEFAULT_MIX, **{k: float(v) for k, v in (item.split("=") for item in args.mix.split(","))}}
  ds = generate(args.out, seed=args.seed, num_train=args.num_train, num_val=args.num_val,
                image_size=args.image_size, difficulty=args.difficulty, vocab_size=args.vocab_size,
                max_turns=args.max_turns, mix=mix)
  print(f"wrote {args.num_train} train and {args.num_val} val records to {ds.root}")


if __name__ == "__main__":
  main()
