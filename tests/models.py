"""Jitted model init and forward, compiled once per config and shared by the whole suite: an
eager model call costs about 2 s on 2 CPU cores, a jitted one a few ms."""

import functools

import flax.linen as nn
import jax

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
def _embed_image(cfg):
  return jax.jit(lambda params, pixels: eem.EEMLLM(cfg).apply({"params": params}, pixels, method="embed_image"))


def embed_image(cfg, params, pixel_values):
  """Projected visual tokens (B, I*P, D)."""
  return _embed_image(cfg)(params, pixel_values)
