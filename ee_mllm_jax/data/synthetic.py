"""A synthetic visual-QA dataset that a small model can learn and text alone cannot answer.

    python -m ee_mllm_jax.data.synthetic --out DIR [--seed 0 --num-train 4000 --image-size 64 ...]

Writes (same arguments -> byte-identical files):

    DIR/images/{train,val}/NNNNNN.png   Pillow-drawn images
    DIR/train.json, DIR/val.json        LLaVA format; val records also carry `question`,
                                        `answer`, `question_type` (and `options` for choices);
                                        train records carry `question_types` per human turn
    DIR/tokenizer.json                  byte-level BPE trained on the corpus (<unk>=0, <s>=1,
                                        </s>=2, <pad>=3, <|im_start|>, <|im_end|>, <image>)
    DIR/benchmarks/                     the val questions in real benchmark formats:
        textvqa_val.json (text), docvqa_val.json (doc), mmbench_dev.tsv (choice_attribute),
        seed_bench.json (choice_spatial); ids are the val record's number
    DIR/manifest.json                   the arguments (ensure_dataset compares them)

Question types and their answers (every answer is drawn uniformly, independently of the
question's wording, so the best text-only guess -- the answer prior -- is 1/|answers|):

    color       "What colour is the square?"                  one of the level's colours
    shape       "What shape is the red object?"                one of the level's shapes
    count       "How many circles are there?"                  1..max_count
    position    "Where is the red circle relative to ...?"     left/right/above/below
    choice_*    the same, as A-D multiple choice (MMBench/SEED) the correct letter
    text        "What word is written in the image?"          a word (TextVQA-like)
    doc         "What is the room on the form?"                a field value (DocVQA-like)

The default (64 px, "easy": big objects on a 2x2 grid, 6 colours, 4 shapes, counts 1-4,
short words from 8, doc values from 8) is meant for the `demo` model on a CPU; larger
images and "medium"/"hard" add colours, shapes, distractors, counts and vocabulary.
"""

from __future__ import annotations

import argparse
import base64
import collections
import csv
import dataclasses
import inspect
import json
import math
import os
import shutil
import tempfile

import numpy as np
import tokenizers
from PIL import Image, ImageDraw, ImageFont

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (235, 200, 30), "purple": (140, 60, 190), "orange": (245, 140, 30),
           "black": (25, 25, 25), "pink": (245, 130, 190), "brown": (130, 80, 40),
           "cyan": (40, 200, 210)}
SHAPES = ("circle", "square", "triangle", "cross", "diamond", "star")
RELATIONS = ("left", "right", "above", "below")
WORDS = ("cat sun map box pen cup key hat dog car bus egg fox jam kit log mug net owl pig "
         "rat sky toy van web zip arm bag bed bee cow fan gem hen ink jet leg lip mop nut "
         "oak pot rug saw tea tub wig bow cap dot ear fig gum hut ice lid mat oar pin ram "
         "rod sea tin urn wax yam").split()
FIELDS = ("code", "room", "total", "year", "page", "item")
DOC_VALUES_EASY = ("12", "25", "37", "48", "53", "66", "74", "89")
BACKGROUND = (210, 210, 210)
CHOICE_SUFFIX = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCD"

LEVELS = {
    "easy": dict(colours=6, shapes=4, max_count=4, words=8, doc_fields=2, distractors=0, grid=2),
    "medium": dict(colours=8, shapes=5, max_count=6, words=32, doc_fields=3, distractors=1, grid=3),
    "hard": dict(colours=10, shapes=6, max_count=9, words=len(WORDS), doc_fields=5, distractors=2, grid=4),
}
QUESTION_TYPES = ("color", "shape", "count", "position", "choice_attribute", "choice_spatial", "text", "doc")
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
    return {name: self.path(f"benchmarks/{file}") for name, file in BENCHMARK_FILES.items()}

  def data_config(self, model_config, **fields):
    """A DataConfig for this dataset and a ModelConfig (image size, P, mean/std)."""
    from ee_mllm_jax.data.pipeline import DataConfig  # pylint: disable=g-import-not-at-top
    return DataConfig.for_model(model_config, train_file=self.train_file, val_file=self.val_file,
                                tokenizer_file=self.tokenizer_file, **fields)


BENCHMARK_FILES = {"textvqa": "textvqa_val.json", "docvqa": "docvqa_val.json",
                   "mmbench": "mmbench_dev.tsv", "seed_bench": "seed_bench.json"}


# ----------------------------------------------------------------------------- drawing


class Canvas:
  """Draws at 4x (2x for big images) and downsamples: smooth edges, deterministic."""

  def __init__(self, size: int, background=BACKGROUND):
    self.size, self.scale = size, 4 if size <= 128 else 2
    self.image = Image.new("RGB", (size * self.scale,) * 2, background)
    self.draw = ImageDraw.Draw(self.image)

  def shape(self, shape: str, cx: float, cy: float, r: float, fill):
    s = self.scale
    cx, cy, r = cx * s, cy * s, r * s
    if shape == "circle":
      self.draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
      h = r * 0.85
      self.draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "cross":
      w = r * 0.35
      self.draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
      self.draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
      corners = {"triangle": 3, "diamond": 4, "star": 10}[shape]
      points = []
      for k in range(corners):
        angle = -math.pi / 2 + 2 * math.pi * k / corners
        radius = r * (0.45 if shape == "star" and k % 2 else 1.0)
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle) + (r * 0.15 if corners == 3 else 0)))
      self.draw.polygon(points, fill=fill)

  def text(self, text: str, x: float, y: float, size: float, fill, anchor="mm"):
    font = ImageFont.load_default(size=max(1, round(size * self.scale)))
    self.draw.text((x * self.scale, y * self.scale), text, fill=fill, font=font, anchor=anchor)

  def finish(self) -> Image.Image:
    return self.image.resize((self.size, self.size), Image.Resampling.LANCZOS)


def _grid_cells(rng, grid: int, n: int) -> list[tuple[int, int]]:
  cells = [(r, c) for r in range(grid) for c in range(grid)]
  return [cells[i] for i in rng.permutation(len(cells))[:n]]


def _draw_objects(size, rng, grid, objects, placed: list | None = None) -> Image.Image:
  """objects: [(shape, colour, (row, col))] drawn in a grid x grid layout with jitter; each
  object's (shape, colour, cx, cy, r) in pixels is appended to `placed` when given."""
  canvas, cell = Canvas(size), size / grid
  for shape, colour, (row, col) in objects:
    r = cell * rng.uniform(0.32, 0.40)
    jitter = (cell / 2 - r) * 0.8
    cx = (col + 0.5) * cell + rng.uniform(-jitter, jitter)
    cy = (row + 0.5) * cell + rng.uniform(-jitter, jitter)
    canvas.shape(shape, cx, cy, r, COLOURS[colour])
    if placed is not None:
      placed.append((shape, colour, cx, cy, r))
  return canvas.finish()


def labelled_scene(rng, size: int, difficulty: str = "easy") -> tuple[Image.Image, list[tuple]]:
  """An object scene drawn as the dataset's object and count scenes are (the level's colours
  and shapes, its grid or one cell more per side, 1 to all cells filled), and what it shows:
  [(shape, colour, cx, cy, r)] in pixels. Supervision for pretraining a vision tower on images
  alone, with no question in sight."""
  maker = SceneMaker(size, difficulty)
  grid = maker.level["grid"] + int(rng.integers(2))
  cells = _grid_cells(rng, grid, int(rng.integers(1, grid * grid + 1)))
  objects = [(maker.shapes[rng.integers(len(maker.shapes))], maker.colours[rng.integers(len(maker.colours))], cell)
             for cell in cells]
  placed: list[tuple] = []
  return _draw_objects(size, rng, grid, objects, placed), placed


# ----------------------------------------------------------------------------- scenes


@dataclasses.dataclass
class Question:
  kind: str  # a QUESTION_TYPES entry
  question: str
  answer: str
  options: list[str] | None = None  # choices: the option texts, answer is a letter
  category: str = ""  # benchmark sub-category


def _choice(rng, kind, question, correct, candidates, category) -> Question:
  others = [c for c in candidates if c != correct]
  options = [correct] + [others[i] for i in rng.permutation(len(others))[:3]]
  options = [options[i] for i in rng.permutation(len(options))]
  return Question(kind, question, LETTERS[options.index(correct)], options, category)


def _plural(shape: str) -> str:
  return shape + ("es" if shape.endswith("s") else "s")


class SceneMaker:
  """Draws one image and asks questions about it, for a given difficulty level."""

  def __init__(self, size: int, difficulty: str):
    if difficulty not in LEVELS:
      raise ValueError(f"difficulty must be one of {list(LEVELS)}, got {difficulty!r}")
    self.size, self.level = size, LEVELS[difficulty]
    self.colours = list(COLOURS)[:self.level["colours"]]
    self.shapes = list(SHAPES[:self.level["shapes"]])
    self.counts = [str(n) for n in range(1, self.level["max_count"] + 1)]
    self.words = WORDS[:self.level["words"]]

  def make(self, rng, kind: str, num_questions: int) -> tuple[Image.Image, list[Question]]:
    """An image and up to `num_questions` questions about it, the first of type `kind`."""
    if kind == "count" or (kind == "choice_spatial" and rng.random() < 0.5):
      return self._count_scene(rng, kind)
    if kind == "text":
      return self._word_scene(rng)
    if kind == "doc":
      return self._doc_scene(rng, num_questions)
    return self._object_scene(rng, kind, num_questions, need_pair=kind in ("position", "choice_spatial"))

  def _object_scene(self, rng, kind, num_questions, need_pair):
    lv = self.level
    n = 2 if need_pair else int(rng.integers(1, 3))
    shapes = [self.shapes[i] for i in rng.permutation(len(self.shapes))[:n + lv["distractors"]]]
    colours = [self.colours[i] for i in rng.permutation(len(self.colours))[:len(shapes)]]
    relation = RELATIONS[rng.integers(4)]
    if n == 2:  # the pair shares a row (left/right) or a column (above/below)
      grid, a, b = lv["grid"], int(rng.integers(lv["grid"])), rng.permutation(lv["grid"])[:2]
      first, second = sorted(int(x) for x in b)
      near, far = (a, first), (a, second)
      if relation in ("above", "below"):
        near, far = (first, a), (second, a)
      cells = [near, far] if relation in ("left", "above") else [far, near]
      free = [c for c in _grid_cells(rng, grid, grid * grid) if c not in cells]
      cells += free[:len(shapes) - 2]
    else:
      cells = _grid_cells(rng, lv["grid"], len(shapes))
    image = _draw_objects(self.size, rng, lv["grid"], list(zip(shapes, colours, cells)))

    def attribute(i, kind):
      shape, colour = shapes[i], colours[i]
      if kind == "color":
        return Question(kind, f"What colour is the {shape}?", colour)
      if kind == "shape":
        return Question(kind, f"What shape is the {colour} object?", shape)
      if rng.random() < 0.5:
        return _choice(rng, kind, f"What colour is the {shape}?", colour, self.colours, "attribute_recognition")
      return _choice(rng, kind, f"What shape is the {colour} object?", shape, self.shapes, "attribute_recognition")

    def position(kind):
      question = f"Where is the {colours[0]} {shapes[0]} relative to the {colours[1]} {shapes[1]}?"
      if kind == "position":
        return Question(kind, question, relation)
      return _choice(rng, kind, question, relation, RELATIONS, "Spatial Relation")

    # Later turns must not be answerable from earlier ones: one attribute question per
    # object, and the position question (which names both objects) always last.
    any_attribute = lambda: ("color", "shape", "choice_attribute")[rng.integers(3)]
    order = [int(i) for i in rng.permutation(n)]
    if kind in ("position", "choice_spatial"):
      asked = [attribute(i, any_attribute()) for i in order][:num_questions - 1] + [position(kind)]
    else:
      asked = [attribute(order[0], kind)] + [attribute(i, any_attribute()) for i in order[1:]]
      if n == 2:
        asked.append(position(("position", "choice_spatial")[rng.integers(2)]))
    return image, asked[:num_questions]

  def _count_scene(self, rng, kind):
    lv = self.level
    count = int(rng.integers(1, lv["max_count"] + 1))
    shape = self.shapes[rng.integers(len(self.shapes))]
    others = [s for s in self.shapes if s != shape]
    distractors = [others[i] for i in rng.integers(len(others), size=int(rng.integers(lv["distractors"] + 1)))]
    grid = max(lv["grid"], math.ceil(math.sqrt(count + len(distractors))))
    objects = [(s, self.colours[rng.integers(len(self.colours))]) for s in [shape] * count + distractors]
    image = _draw_objects(self.size, rng, grid, [o + (c,) for o, c in zip(objects, _grid_cells(rng, grid, len(objects)))])
    question = f"How many {_plural(shape)} are there?"
    if kind == "count":  # one question: a second about the same count would give it away
      return image, [Question("count", question, str(count))]
    return image, [_choice(rng, kind, question, str(count), self.counts + ["0"], "Instances Counting")]

  def _word_scene(self, rng):
    word = self.words[rng.integers(len(self.words))]
    canvas = Canvas(self.size, background=(245, 245, 240))
    colour = list(COLOURS.values())[rng.choice([0, 2, 4, 6, 8])]
    jitter = self.size * 0.08
    canvas.text(word, self.size / 2 + rng.uniform(-jitter, jitter), self.size / 2 + rng.uniform(-jitter, jitter),
                self.size * rng.uniform(0.28, 0.34), colour)
    return canvas.finish(), [Question("text", "What word is written in the image?", word)]

  def _doc_scene(self, rng, num_questions):
    lv = self.level
    fields = [FIELDS[i] for i in rng.permutation(len(FIELDS))[:lv["doc_fields"]]]
    if lv["doc_fields"] <= 2:
      values = [DOC_VALUES_EASY[i] for i in rng.integers(len(DOC_VALUES_EASY), size=len(fields))]
    else:
      values = [str(v) for v in rng.integers(10, 100 if lv["doc_fields"] <= 3 else 10000, size=len(fields))]
    canvas, s = Canvas(self.size, background=(255, 255, 255)), self.size
    canvas.draw.rectangle([0, 0, s * canvas.scale, s * 0.14 * canvas.scale], fill=(90, 90, 140))
    line = (s * 0.8) / (len(fields) + 0.5)
    for k, (field, value) in enumerate(zip(fields, values)):
      canvas.text(f"{field}: {value}", s * 0.06, s * 0.22 + (k + 0.5) * line, min(line * 0.75, s * 0.2),
                  (0, 0, 0), anchor="lm")
    asked = rng.permutation(len(fields))[:max(1, min(num_questions, len(fields)))]
    return canvas.finish(), [Question("doc", f"What is the {fields[i]} on the form?", values[i]) for i in asked]


# ----------------------------------------------------------------------------- records


def _human_value(q: Question, with_image: bool) -> str:
  text = q.question
  if q.options:
    text += "".join(f"\n{letter}. {option}" for letter, option in zip(LETTERS, q.options)) + "\n" + CHOICE_SUFFIX
  return ("<image>\n" if with_image else "") + text


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
            CHOICE_SUFFIX] + [t["value"].replace("<image>", "") for r in records for t in r["conversations"]]
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(corpus, trainer=trainer)
  tok.save(path)


def _write_benchmarks(root, records):
  os.makedirs(os.path.join(root, "benchmarks"), exist_ok=True)
  by_kind = lambda kind: [(int(r["id"].split("-")[1]), r) for r in records if r["question_type"] == kind]
  textvqa = [{"question_id": i, "question": r["question"], "image_id": os.path.splitext(os.path.basename(r["image"]))[0],
              "image_path": r["image"], "image_width": None, "image_height": None, "image_classes": [],
              "answers": [r["answer"]] * 10, "question_tokens": r["question"].lower().rstrip("?").split(),
              "set_name": "val", "flickr_original_url": "", "flickr_300k_url": ""}
             for i, r in by_kind("text")]
  docvqa = [{"questionId": i, "question": r["question"], "question_types": ["form"], "image": r["image"],
             "docId": i, "ucsf_document_id": f"synthetic{i:06d}", "ucsf_document_page_no": "1",
             "answers": [r["answer"]], "data_split": "val"} for i, r in by_kind("doc")]
  seed_types = {"Instances Counting": 5, "Spatial Relation": 6}
  seed = [{"question_id": str(i), "question": r["question"], "answer": r["answer"],
           **{f"choice_{letter.lower()}": o for letter, o in zip(LETTERS, r["options"])},
           "data_id": r["image"], "data_type": "image", "question_type_id": seed_types[r["category"]]}
          for i, r in by_kind("choice_spatial")]
  with open(os.path.join(root, "benchmarks", BENCHMARK_FILES["textvqa"]), "w") as f:
    json.dump({"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": textvqa}, f, indent=1)
  with open(os.path.join(root, "benchmarks", BENCHMARK_FILES["docvqa"]), "w") as f:
    json.dump({"dataset_name": "docvqa", "dataset_version": "1.0", "dataset_split": "val", "data": docvqa}, f, indent=1)
  with open(os.path.join(root, "benchmarks", BENCHMARK_FILES["seed_bench"]), "w") as f:
    json.dump({"question_type": seed_types, "questions": seed}, f, indent=1)
  with open(os.path.join(root, "benchmarks", BENCHMARK_FILES["mmbench"]), "w", newline="") as f:
    writer = csv.writer(f, delimiter="\t", lineterminator="\n")
    writer.writerow(["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image",
                     "source", "l2-category", "comment", "split"])
    for i, r in by_kind("choice_attribute"):
      with open(os.path.join(root, r["image"]), "rb") as img:
        image_b64 = base64.b64encode(img.read()).decode()
      writer.writerow([i, r["question"], "", *r["options"], r["answer"], r["category"], image_b64,
                       "synthetic", "fine-grained_perception (instance-level)", "", "dev"])


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
    return SyntheticDataset(out_dir)
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
