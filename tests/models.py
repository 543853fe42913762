"""Jitted model init and forward, compiled once per config and shared by the whole suite: an
eager model call costs about 2 s on 2 CPU cores, a jitted one a few ms."""

import functools

import flax.linen as nn
import jax
import numpy as np

import ee_mllm_jax as eem
from ee_mllm_jax import batch as batch_lib


@functools.cache
def _init(cfg):
  return jax.jit(lambda key: nn.meta.unbox(eem.EEMLLM(cfg).init(key, **batch_lib.example(cfg))["params"]))


def init_params(cfg, seed=0):
  """The model's parameters for `jax.random.key(seed)`. They depend on neither the batch nor
  the switches that only change how they are used (mode, compute dtype, remat), so one init
  serves every such variant."""
  same_params = cfg.replace(attention="self", visual_ffn=True, dtype=cfg.param_dtype, remat="none", scan_unroll=1)
  return _init(same_params)(jax.random.key(seed))


@functools.cache
def _forward(cfg):
  return jax.jit(lambda params, batch: eem.EEMLLM(cfg).apply({"params": params}, **batch))


def forward(cfg, params, batch):
  """Text logits (B, T, vocab) of `batch` (extra keys such as labels are dropped)."""
  return _forward(cfg)(params, batch_lib.model_inputs(batch))


@functools.cache
def _forward_ranked(cfg):
  return jax.jit(lambda params, batch, rank: eem.EEMLLM(cfg).apply({"params": params}, **batch, rank_text=rank))


@functools.cache
def _embed_image(cfg):
  return jax.jit(lambda params, pixels: eem.EEMLLM(cfg).apply({"params": params}, pixels, method="embed_image"))


def embed_image(cfg, params, pixel_values):
  """Projected visual tokens (B, I*P, D)."""
  return _embed_image(cfg)(params, pixel_values)


def greedy_by_full_forward(cfg, params, batch, steps, rank=None):
  """The uncached definition: append each row's argmax to its prompt, rerun the whole model.
  FastV: `rank` (B, T) marks the text that ranks the visual tokens (None: the prompt)."""
  b = batch["input_ids"].shape[0]
  grown = {k: v for k, v in batch.items() if k != "labels"}
  for k, fill in [("input_ids", 0), ("text_positions", 0), ("text_valid", False)]:
    grown[k] = np.concatenate([batch[k], np.full((b, steps), fill, batch[k].dtype)], axis=1)
  n_prompt = batch["text_valid"].sum(1)
  next_pos = np.max(np.where(batch["text_valid"], batch["text_positions"], -1), 1) + 1
  rows = np.arange(b)
  tokens, logprobs = np.zeros((b, steps), np.int32), np.zeros((b, steps), np.float32)
  rank = batch["text_valid"] if rank is None else rank
  prompt = np.concatenate([rank, np.zeros((b, steps), bool)], axis=1)
  for i in range(steps):
    if cfg.mode.fastv:  # FastV ranks by the prompt's queries, as the cached prefill does
      logits = np.asarray(_forward_ranked(cfg)(params, batch_lib.model_inputs(grown), prompt))[rows, n_prompt + i - 1]
    else:
      logits = np.asarray(forward(cfg, params, grown))[rows, n_prompt + i - 1]
    tokens[:, i] = logits.argmax(-1)
    logprobs[:, i] = np.asarray(jax.nn.log_softmax(logits))[rows, tokens[:, i]]
    col = n_prompt + i
    grown["input_ids"][rows, col] = tokens[:, i]
    grown["text_positions"][rows, col] = next_pos + i
    grown["text_valid"][rows, col] = True
  return tokens, logprobs


def assert_cached_generation_equals_full_forwards(cfg, batch, steps=6):
  """`eem.generate` (prefill and cached decode) gives the tokens, and log-probs to 1e-5, of
  `greedy_by_full_forward` on random parameters."""
  params = init_params(cfg)
  out = eem.generate(params, cfg, batch, max_new_tokens=steps)
  want_tokens, want_logprobs = greedy_by_full_forward(cfg, params, batch, steps)
  np.testing.assert_array_equal(np.asarray(out.tokens), want_tokens)
  np.testing.assert_allclose(np.asarray(out.logprobs), want_logprobs, rtol=0, atol=1e-5)
