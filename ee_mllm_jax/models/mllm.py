"""EEMLLM: vision tower -> projector -> two-stream decoder, in self, composite or cross mode.

Inputs follow the batch contract of `ee_mllm_jax.batch` (checked at trace time, so a wrong
shape or dtype is named before anything runs); `labels` may ride along in a training batch
and is ignored here (the loss lives in the trainer). Parameter groups at the top of the tree:
`vision/`, `projector/`, `llm/` (cross mode adds `llm/cross/` and, with latents, `resampler/`).

Cross mode hands the decoder media (B, I, M, E) -- the projected tokens per image (E = D), or
with `cross_media_width="vision"` the tower's features (E = its width, no projector), or the
resampler's latents over either -- with each image's last position and validity (B, I), instead
of the visual stream.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ee_mllm_jax import batch as batch_lib
from ee_mllm_jax.config import ModelConfig
from ee_mllm_jax.models import reduction
from ee_mllm_jax.models.cross import PerceiverResampler
from ee_mllm_jax.models.llm import LLM
from ee_mllm_jax.models.projector import Projector
from ee_mllm_jax.models.vision import VisionTower


class EEMLLM(nn.Module):
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    self.vision = VisionTower(cfg.vision, remat=cfg.remat, unroll=cfg.scan_unroll, **kw)
    if cfg.has_projector:  # not in cross mode with media at the vision width: no unused parameters
      self.projector = Projector(cfg.projector, cfg.vision.width, cfg.llm.width, **kw)
    self.llm = LLM(cfg.llm, cfg.mode, media_dim=cfg.media_width, remat=cfg.remat, unroll=cfg.scan_unroll, **kw)
    if getattr(cfg.mode, "resampler_latents", 0):
      self.resampler = PerceiverResampler(cfg.llm, cfg.mode, remat=cfg.remat, unroll=cfg.scan_unroll, **kw)

  def embed_image(self, pixel_values):
    """(B, I, Y, X, C) -> the visual tokens the decoder reads (B, I*P, E): projected (E = D), or,
    in cross mode with `cross_media_width="vision"`, the tower's features (E = the tower's width)."""
    b, i = pixel_values.shape[:2]
    images, mode = pixel_values.reshape((b * i,) + pixel_values.shape[2:]), self.cfg.mode
    if mode.visionzip:  # P -> dominant + contextual tokens per image, before the projector
      feats = reduction.visionzip_merge(*self.vision(images, scores=True), mode.visionzip_dominant,
                                        mode.visionzip_contextual)
    else:
      feats = self.vision(images)
    if self.cfg.has_projector:
      feats = self.projector(feats)
    return feats.reshape(b, i * feats.shape[1], feats.shape[-1])  # explicit: i = 0 (text-only batches) has no -1

  def _checked(self, pixel_values, image_valid, input_ids, text_positions, text_valid, visual_positions):
    """Validates the inputs against the batch contract; -> what the decoder reads of the images:
    (x_v, visual positions, visual validity), or in cross mode (media, media positions, validity)."""
    batch_lib.validate(dict(pixel_values=pixel_values, image_valid=image_valid, input_ids=input_ids,
                            text_positions=text_positions, text_valid=text_valid,
                            visual_positions=visual_positions), self.cfg)
    x_v, valid_v = self.embed_image(pixel_values), batch_lib.visual_valid(image_valid, visual_positions.shape[1])
    if self.cfg.mode.visual_in_decoder:
      return x_v, visual_positions, valid_v
    return self.media(x_v, image_valid, visual_positions)

  def media(self, x_v, image_valid, visual_positions):
    """Cross mode: visual tokens (B, I*P, E) (`embed_image`) -> media (B, I, M, E) (resampled when
    configured), each image's last position (B, I) and validity (B, I)."""
    b, i = image_valid.shape
    media = x_v.reshape(b, i, -1, x_v.shape[-1])
    if getattr(self.cfg.mode, "resampler_latents", 0):
      media = self.resampler(media)
    return media, jnp.max(visual_positions.reshape(b, i, -1), axis=-1), image_valid

  def forward(self, pixel_values, image_valid, input_ids, text_positions, text_valid, visual_positions,
              rank_text=None):
    """Text-stream logits (B, T, vocab) float32 and the per-layer keys/values over [visual; text].
    FastV: `rank_text` (B, T) bool marks the text queries that rank the visual tokens (None: every
    valid one; a cached prefill ranks by its prompt, so the full forward that equals a cached
    generation ranks by the prompt alone)."""
    x_v, pos_v, valid_v = self._checked(pixel_values, image_valid, input_ids, text_positions, text_valid,
                                        visual_positions)
    return self.llm(x_v, input_ids, pos_v, text_positions, valid_v, text_valid, rank_text)

  def __call__(self, pixel_values, image_valid, input_ids, text_positions, text_valid, visual_positions,
               labels=None, rank_text=None):
    del labels  # accepted so that a whole training batch can be passed with **batch
    logits, _ = self.forward(pixel_values, image_valid, input_ids, text_positions, text_valid, visual_positions,
                             rank_text)
    return logits

  def prefill(self, pixel_values, image_valid, input_ids, text_positions, text_valid, visual_positions,
              cache_size=None):
    """`forward` that keeps what generation needs: next-token logits (B, vocab) at each row's last
    valid text token and the KV cache grown to `cache_size` slots (see `LLM.prefill`)."""
    x_v, pos_v, valid_v = self._checked(pixel_values, image_valid, input_ids, text_positions, text_valid,
                                        visual_positions)
    return self.llm.prefill(x_v, input_ids, pos_v, text_positions, valid_v, text_valid, cache_size)

  def extend(self, input_ids, text_positions, text_valid, cache: batch_lib.Cache):
    """Text tokens against a KV cache (see `LLM.extend`); -> logits (B, T, vocab), new cache."""
    return self.llm.extend(input_ids, text_positions, text_valid, cache)
