"""The synthetic dataset's scenes: Pillow-drawn images (objects on a grid, a word, a form) and
the questions asked about each, per difficulty level. `data.synthetic` turns them into records.

    maker = SceneMaker(64, "easy")
    image, questions = maker.make(rng, "position", num_questions=2)
    image, placed = labelled_scene(rng, 64)      # objects and where they are, no question
    image, glyphs = labelled_text_scene(rng, 64) # a sign or a form, and where each character is
"""

from __future__ import annotations

import dataclasses
import math

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
LETTERS = "ABCD"

LEVELS = {
    "easy": dict(colours=6, shapes=4, max_count=4, words=8, doc_fields=2, distractors=0, grid=2),
    "medium": dict(colours=8, shapes=5, max_count=6, words=32, doc_fields=3, distractors=1, grid=3),
    "hard": dict(colours=10, shapes=6, max_count=9, words=len(WORDS), doc_fields=5, distractors=2, grid=4),
}

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

  def text(self, text: str, x: float, y: float, size: float, fill, anchor="mm") -> list[tuple]:
    """Draws `text` anchored at (x, y); -> each drawn character's box in output pixels,
    [(char, x0, y0, x1, y1)] (from the font's advance widths; spaces left out)."""
    font = ImageFont.load_default(size=max(1, round(size * self.scale)))
    s = self.scale
    self.draw.text((x * s, y * s), text, fill=fill, font=font, anchor=anchor)
    _, top, _, bottom = font.getbbox(text, anchor=anchor)
    left = x * s - (font.getlength(text) / 2 if anchor[0] == "m" else 0.0)
    boxes = []
    for k, char in enumerate(text):
      if not char.isspace():
        x0, x1 = left + font.getlength(text[:k]), left + font.getlength(text[:k + 1])
        boxes.append((char, x0 / s, (y * s + top) / s, x1 / s, (y * s + bottom) / s))
    return boxes

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


def labelled_text_scene(rng, size: int) -> tuple[Image.Image, list[tuple]]:
  """A sign with a word (any of WORDS) or a form with 1-3 "field: value" lines (values of 2-4
  digits), drawn as the dataset draws its text and form scenes, and where every character is:
  [(char, x0, y0, x1, y1)] in pixels. The glyph part of a tower's pretraining (what CLIP knows of
  text), with no question in sight."""
  if rng.random() < 0.5:
    return _sign(size, rng, WORDS[rng.integers(len(WORDS))])
  n = int(rng.integers(1, 4))
  fields = [FIELDS[i] for i in rng.permutation(len(FIELDS))[:n]]
  values = [str(int(rng.integers(10, 10 ** int(rng.integers(2, 5))))) for _ in fields]
  return _form(size, fields, values)


SIGN_COLOURS = ((250, 250, 245), (250, 235, 150), (175, 215, 245), (185, 230, 175), (240, 200, 215))
INK = ("black", "red", "blue", "purple", "brown", "green")


def _sign(size, rng, word) -> tuple[Image.Image, list[tuple]]:
  """`word` on a sign board: board and ink colours, text size (22-36% of the image) and place vary."""
  canvas = Canvas(size, background=BACKGROUND)
  text_size = size * rng.uniform(0.22, 0.36)
  half_w, half_h = min(size * 0.47, text_size * 0.36 * len(word) + size * 0.06), text_size * 0.62
  cx = size / 2 + rng.uniform(-1, 1) * max(0.0, size / 2 - half_w - 1)
  cy = size / 2 + rng.uniform(-1, 1) * max(0.0, size / 2 - half_h - 1)
  s = canvas.scale
  canvas.draw.rectangle([(cx - half_w) * s, (cy - half_h) * s, (cx + half_w) * s, (cy + half_h) * s],
                        fill=SIGN_COLOURS[rng.integers(len(SIGN_COLOURS))], outline=(60, 60, 60), width=s)
  glyphs = canvas.text(word, cx, cy, text_size, COLOURS[INK[rng.integers(len(INK))]])
  return canvas.finish(), glyphs


def _form(size, fields, values) -> tuple[Image.Image, list[tuple]]:
  """A form: a header bar, then one "field: value" line per field."""
  canvas, s = Canvas(size, background=(255, 255, 255)), size
  canvas.draw.rectangle([0, 0, s * canvas.scale, s * 0.14 * canvas.scale], fill=(90, 90, 140))
  line = (s * 0.8) / (len(fields) + 0.5)
  glyphs = []
  for k, (field, value) in enumerate(zip(fields, values)):
    glyphs += canvas.text(f"{field}: {value}", s * 0.06, s * 0.22 + (k + 0.5) * line, min(line * 0.75, s * 0.2),
                          (0, 0, 0), anchor="lm")
  return canvas.finish(), glyphs


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
    image, _ = _sign(self.size, rng, word)
    return image, [Question("text", "What does the sign say?", word)]

  def _doc_scene(self, rng, num_questions):
    lv = self.level
    fields = [FIELDS[i] for i in rng.permutation(len(FIELDS))[:lv["doc_fields"]]]
    if lv["doc_fields"] <= 2:
      values = [DOC_VALUES_EASY[i] for i in rng.integers(len(DOC_VALUES_EASY), size=len(fields))]
    else:
      values = [str(v) for v in rng.integers(10, 100 if lv["doc_fields"] <= 3 else 10000, size=len(fields))]
    image, _ = _form(self.size, fields, values)
    asked = rng.permutation(len(fields))[:max(1, min(num_questions, len(fields)))]
    return image, [Question("doc", f"What is the {fields[i]} on the form?", values[i]) for i in asked]
