"""The vision tower's pretraining for benchmarks/data_efficiency.py: the stand-in for CLIP.

The tower is trained from scratch on labelled synthetic scenes drawn as the dataset draws them,
with no question in sight: object scenes (`scenes.labelled_scene`) and, for a third of the
images, signs and forms (`scenes.labelled_text_scene`: what CLIP knows of text). Linear read-outs
of each visual token's colour, shape and character (the glyph whose centre lies in the patch) and
of each image's object counts carry the supervision and are thrown away after. This is
a different objective from the package's trainer (which trains the whole MLLM on conversations):
no decoder is involved, so no attention mode is favoured by how the tower was made.
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import numpy as np
import optax

import ee_mllm_jax as eem
from ee_mllm_jax.data import images as image_lib
from ee_mllm_jax.data import scenes
from ee_mllm_jax.models.vision import VisionTower


# The characters a glyph read-out tells apart (index + 1; 0: no character's centre in the patch).
GLYPHS = "abcdefghijklmnopqrstuvwxyz0123456789:"
# The words a word read-out tells apart (index + 1; 0: no text line over the patch): a sign's word,
# or the field a form line gives the value of.
WORD_CLASSES = tuple(scenes.WORDS) + tuple(scenes.FIELDS)
TEXT_SHARE = 3  # every TEXT_SHARE-th image is a sign or a form


class TowerPretrainer(nn.Module):
  """The tower with linear read-outs: each visual token's colour, shape, glyph and word (0: none)
  and, from the mean token, how many objects of each colour and shape the image holds."""

  cfg: eem.VisionConfig
  colours: int
  shapes: int
  max_count: int

  @nn.compact
  def __call__(self, images):
    x = VisionTower(self.cfg, name="vision")(images)  # (B, P, D): the features LLaVA reads
    pooled = x.mean(axis=1)
    counts = lambda n, name: nn.Dense(n * (self.max_count + 1), name=name)(pooled).reshape(
        x.shape[0], n, self.max_count + 1)
    return (nn.Dense(self.colours + 1, name="token_colour")(x), nn.Dense(self.shapes + 1, name="token_shape")(x),
            counts(self.colours, "colour_counts"), counts(self.shapes, "shape_counts"),
            nn.Dense(len(GLYPHS) + 1, name="token_glyph")(x), nn.Dense(len(WORD_CLASSES) + 1, name="token_word")(x))


def scene_labels(placed, cfg: eem.VisionConfig, colours, shapes, max_count):
  """Per-token colour/shape (the object whose disc covers the patch centre; 0: none) and counts."""
  g, p = cfg.grid, cfg.patch_size
  centre = (np.arange(g) + 0.5) * p
  tok_c, tok_s = np.zeros((g, g), np.int32), np.zeros((g, g), np.int32)
  n_c, n_s = np.zeros(len(colours), np.int32), np.zeros(len(shapes), np.int32)
  for shape, colour, cx, cy, r in placed:
    inside = (centre[None, :] - cx) ** 2 + (centre[:, None] - cy) ** 2 <= r ** 2
    tok_c[inside], tok_s[inside] = colours.index(colour) + 1, shapes.index(shape) + 1
    n_c[colours.index(colour)] += 1
    n_s[shapes.index(shape)] += 1
  return tok_c.reshape(-1), tok_s.reshape(-1), np.minimum(n_c, max_count), np.minimum(n_s, max_count)


def glyph_labels(glyphs, cfg: eem.VisionConfig) -> np.ndarray:
  """Per-token glyph: the character whose box centre lies in the patch (1 + GLYPHS index; 0: none)."""
  g, p = cfg.grid, cfg.patch_size
  out = np.zeros((g, g), np.int32)
  for char, x0, y0, x1, y1 in glyphs:
    col, row = int((x0 + x1) / 2 // p), int((y0 + y1) / 2 // p)
    if 0 <= row < g and 0 <= col < g and char in GLYPHS:
      out[row, col] = GLYPHS.index(char) + 1
  return out.reshape(-1)


def word_labels(glyphs, cfg: eem.VisionConfig) -> np.ndarray:
  """Per-token word (1 + WORD_CLASSES index; 0: none): each text line (its glyphs share a top) labels
  the patches whose centre lies in the line's box, and the patches of its glyphs' centres, with
  its word (a sign) or its field (a form line, "field: value")."""
  g, p = cfg.grid, cfg.patch_size
  centre = (np.arange(g) + 0.5) * p
  out = np.zeros((g, g), np.int32)
  lines: dict[float, list] = {}
  for box in glyphs:
    lines.setdefault(round(box[2], 3), []).append(box)
  for boxes in lines.values():
    label = WORD_CLASSES.index("".join(b[0] for b in boxes).split(":")[0]) + 1
    x0, y0 = min(b[1] for b in boxes), min(b[2] for b in boxes)
    x1, y1 = max(b[3] for b in boxes), max(b[4] for b in boxes)
    out[(centre[:, None] >= y0) & (centre[:, None] <= y1) & (centre[None, :] >= x0) & (centre[None, :] <= x1)] = label
    for _, bx0, by0, bx1, by1 in boxes:
      row, col = int((by0 + by1) / 2 // p), int((bx0 + bx1) / 2 // p)
      if 0 <= row < g and 0 <= col < g:
        out[row, col] = label
  return out.reshape(-1)


def labelled_image(rng, index: int, cfg: eem.VisionConfig, colours, shapes, max_count):
  """Image `index` of the pretraining set and its six labels: every TEXT_SHARE-th is a sign or a
  form (no objects), the rest object scenes (no glyphs or words)."""
  g2 = cfg.grid ** 2
  if index % TEXT_SHARE == TEXT_SHARE - 1:
    image, glyphs = scenes.labelled_text_scene(rng, cfg.image_size)
    zeros = np.zeros(g2, np.int32)
    labels = (zeros, zeros, np.zeros(len(colours), np.int32), np.zeros(len(shapes), np.int32), glyph_labels(glyphs, cfg),
              word_labels(glyphs, cfg))
  else:
    image, placed = scenes.labelled_scene(rng, cfg.image_size, "easy")
    labels = scene_labels(placed, cfg, colours, shapes, max_count) + (np.zeros(g2, np.int32),) * 2
  return image_lib.preprocess(image, size=cfg.image_size, mean=cfg.image_mean, std=cfg.image_std), labels


def pretrain_tower(cfg: eem.VisionConfig, *, images: int, steps: int, batch: int, lr: float,
                   seed: int) -> tuple[dict, dict]:
  """The vision tower trained from scratch on labelled synthetic images (`labelled_image`: object
  scenes, signs and forms, with no question): per-token colour, shape and glyph, per-image counts.
  -> its parameters and what it reached on held-out images."""
  t0 = time.perf_counter()
  maker = scenes.SceneMaker(cfg.image_size, "easy")
  colours, shapes = maker.colours, maker.shapes
  max_count = (maker.level["grid"] + 1) ** 2
  rng = np.random.default_rng(seed)
  n_total = images + images // 10
  pixels, labels = zip(*(labelled_image(rng, i, cfg, colours, shapes, max_count) for i in range(n_total)))
  pixels = np.stack(pixels)
  labels = [np.stack(x) for x in zip(*labels)]
  train_x, test_x = pixels[:images], pixels[images:]
  train_y, test_y = [y[:images] for y in labels], [y[images:] for y in labels]

  model = TowerPretrainer(cfg, len(colours), len(shapes), max_count)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(seed), train_x[:2])["params"])
  opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, steps // 20, steps), weight_decay=0.01)
  opt_state = opt.init(params)

  def losses(p, x, ys):
    outs = model.apply({"params": p}, x)
    return [optax.softmax_cross_entropy_with_integer_labels(o, y).mean() for o, y in zip(outs, ys)], outs

  @jax.jit
  def step(p, s, x, ys):
    (loss, _), g = jax.value_and_grad(lambda p: (sum(losses(p, x, ys)[0]), None), has_aux=True)(p)
    updates, s = opt.update(g, s, p)
    return optax.apply_updates(p, updates), s, loss

  order = np.random.default_rng(seed + 1)
  for i in range(steps):
    idx = order.integers(0, len(train_x), batch)
    params, opt_state, loss = step(params, opt_state, train_x[idx], [y[idx] for y in train_y])
  outs = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, test_x)
  acc = [float(np.mean(np.argmax(np.asarray(o), -1) == y)) for o, y in zip(outs, test_y)]
  where = lambda o, y, m: float(np.mean(np.argmax(np.asarray(o), -1)[m] == y[m]))
  objects, glyphs, words = test_y[0] > 0, test_y[4] > 0, test_y[5] > 0  # token accuracy where an object / ... is
  obj_acc = [where(o, y, objects) for o, y in zip(outs[:2], test_y[:2])]
  info = dict(what=f"{images} labelled synthetic images, no question: object scenes (`scenes.labelled_scene`) and, "
                   f"one in {TEXT_SHARE}, signs and forms with rendered words and digits "
                   "(`scenes.labelled_text_scene`); read-outs of each visual token's colour, shape, character and word "
                   "(a sign's word, a form line's field), each image's count per colour and shape",
              records=images, steps=steps, seconds=time.perf_counter() - t0, final_loss=float(loss),
              held_out=dict(images=len(test_x), token_colour=acc[0], token_shape=acc[1],
                            object_token_colour=obj_acc[0], object_token_shape=obj_acc[1],
                            colour_counts=acc[2], shape_counts=acc[3], glyph_token=where(outs[4], test_y[4], glyphs),
                            word_token=where(outs[5], test_y[5], words)))
  print(f"tower pretraining: {steps} steps in {info['seconds']:.0f} s, held-out {info['held_out']}", flush=True)
  return params["vision"], info
