"""Random batches in the DESIGN §3 layout from per-row interleaving plans.

A plan is a list of segments: an int n = n text tokens, "img" = the row's next image.
Rows are padded to the longest text stream and to `max_images`.
"""

from __future__ import annotations

import numpy as np


def make_batch(cfg, plans, max_images=2, rng=None, seed=0):
  rng = rng or np.random.default_rng(seed)
  p, s = cfg.tokens_per_image, cfg.vision.image_size
  b = len(plans)
  n_text = [sum(seg for seg in plan if seg != "img") for plan in plans]
  t = max(n_text) + 1  # at least one pad column
  batch = dict(
      pixel_values=rng.standard_normal((b, max_images, s, s, 3)).astype(np.float32),
      image_valid=np.zeros((b, max_images), bool),
      input_ids=rng.integers(0, cfg.llm.vocab_size, (b, t)).astype(np.int32),
      text_positions=np.zeros((b, t), np.int32),
      text_valid=np.zeros((b, t), bool),
      visual_positions=np.zeros((b, max_images * p), np.int32),
      labels=np.full((b, t), -100, np.int32),
  )
  for row, plan in enumerate(plans):
    pos = n_img = n_txt = 0
    for seg in plan:
      if seg == "img":
        batch["image_valid"][row, n_img] = True
        batch["visual_positions"][row, n_img * p:(n_img + 1) * p] = np.arange(pos, pos + p)
        pos, n_img = pos + p, n_img + 1
      else:
        batch["text_positions"][row, n_txt:n_txt + seg] = np.arange(pos, pos + seg)
        batch["text_valid"][row, n_txt:n_txt + seg] = True
        pos, n_txt = pos + seg, n_txt + seg
  return batch


# system prompt before the image; two images; text-only row; short row (padding everywhere)
MIXED_PLANS = [[3, "img", 5], [2, "img", 3, "img", 4], [7], ["img", 2]]
