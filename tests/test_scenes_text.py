"""The text scenes (signs and forms) and the glyph labels a vision tower is pretrained on
(`scenes.labelled_text_scene`): deterministic from the seed, and every character box holds the
ink of that character and nothing else's."""

import numpy as np
import pytest

from ee_mllm_jax.data import scenes


def _ink(image, background_box_colours) -> np.ndarray:
  """Pixels far from every background colour (the sign boards, the page, the scene's grey)."""
  x = np.asarray(image, np.float64)
  dist = np.min([np.abs(x - np.asarray(c, np.float64)).sum(-1) for c in background_box_colours], axis=0)
  return dist > 120


@pytest.mark.parametrize("size", [48, 128])
def test_text_scenes_are_deterministic_from_the_seed(size):
  draw = lambda seed: [scenes.labelled_text_scene(np.random.default_rng([seed, i]), size) for i in range(6)]
  a, b, c = draw(0), draw(0), draw(1)
  assert all(np.array_equal(np.asarray(x[0]), np.asarray(y[0])) and x[1] == y[1] for x, y in zip(a, b))
  assert any(not np.array_equal(np.asarray(x[0]), np.asarray(y[0])) for x, y in zip(a, c))


def test_glyph_boxes_cover_the_ink_of_their_characters():
  """At 128 px: the ink inside the boxes is almost all the ink, each box holds ink, and the
  boxes spell the words and the "field: value" lines that were drawn."""
  backgrounds = list(scenes.SIGN_COLOURS) + [(255, 255, 255), scenes.BACKGROUND, (90, 90, 140), (60, 60, 60)]
  rng = np.random.default_rng(0)
  kinds = set()
  for _ in range(24):
    image, glyphs = scenes.labelled_text_scene(rng, 128)
    text = "".join(g[0] for g in glyphs)
    kinds.add("form" if ":" in text else "sign")
    if ":" not in text:
      assert text in scenes.WORDS
    ink = _ink(image, backgrounds)
    inside = np.zeros_like(ink)
    ink[:int(128 * 0.14) + 1] = False  # the form's header bar
    for char, x0, y0, x1, y1 in glyphs:
      box = np.zeros_like(ink)
      box[int(y0):int(np.ceil(y1)) + 1, int(x0):int(np.ceil(x1)) + 1] = True
      assert (ink & box).any(), (char, text)
      inside |= box
    # the sign board's outline is ink outside any glyph: leave out the pixels near it
    assert (ink & inside).sum() >= 0.9 * (ink & _near_glyphs(glyphs, ink.shape)).sum()
  assert kinds == {"sign", "form"}


def _near_glyphs(glyphs, shape, pad=3):
  """The glyphs' line bands widened by `pad` pixels: where stray ink would show a misplaced box."""
  out = np.zeros(shape, bool)
  x0, x1 = min(g[1] for g in glyphs), max(g[3] for g in glyphs)
  for _, _, y0, _, y1 in glyphs:
    out[max(0, int(y0) - pad):int(y1) + pad, max(0, int(x0) - pad):int(x1) + pad] = True
  return out


def test_the_dataset_asks_what_the_sign_says():
  maker = scenes.SceneMaker(48, "easy")
  rng = np.random.default_rng(3)
  image, (q,) = maker.make(rng, "text", 1)
  assert q.question == "What does the sign say?" and q.answer in maker.words and image.size == (48, 48)


def test_word_labels_mark_each_text_line_with_its_word_or_field():
  """The tower's word read-out (`tower_pretraining.word_labels`): on a sign every patch holding a
  glyph's centre carries the sign's word, on a form each line's patches carry that line's field,
  and patches away from the text carry none; a label shifted by a line would fail."""
  import os  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
  import tower_pretraining as tp  # pylint: disable=g-import-not-at-top
  import ee_mllm_jax as eem  # pylint: disable=g-import-not-at-top
  cfg = eem.ModelConfig.preset("demo").vision.replace(image_size=48, patch_size=6)
  rng, kinds = np.random.default_rng(3), set()
  for _ in range(12):
    _, glyphs = scenes.labelled_text_scene(rng, 48)
    words, chars = tp.word_labels(glyphs, cfg).reshape(8, 8), tp.glyph_labels(glyphs, cfg).reshape(8, 8)
    lines = {}
    for box in glyphs:
      lines.setdefault(box[2], []).append(box)
    kinds.add(any(b[0] == ":" for b in glyphs))  # a form (its lines hold "field:"), or a sign
    assert words[chars > 0].all() and (words > 0).sum() >= (chars > 0).sum()
    for boxes in lines.values():
      text = "".join(b[0] for b in boxes)
      label = tp.WORD_CLASSES.index(text.split(":")[0]) + 1
      for _, x0, y0, x1, y1 in boxes:
        row, col = int((y0 + y1) / 2 // 6), int((x0 + x1) / 2 // 6)
        if row < 8 and col < 8:  # a long form line may run past the right edge
          assert words[row, col] == label, text
    rows = [r for r in range(8) if (words[r] > 0).any()]
    top = min(min(b[2] for b in glyphs), 48) // 6
    assert all(r >= int(top) for r in rows) and not words[:int(top)].any()
  assert kinds == {True, False}  # both signs and forms were drawn
