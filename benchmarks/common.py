"""What the benchmarks share: the width-scaled LLaVA-1.5-7B shape, timing, and batches.

Benchmarks run as scripts (`python benchmarks/x.py`), so this directory is on sys.path.
"""

from __future__ import annotations

import time

import jax
import numpy as np

import ee_mllm_jax as eem
from ee_mllm_jax import batch as batch_lib


def scaled_llava(width: int, layers: int, vocab: int | None = None) -> eem.ModelConfig:
  """LLaVA-1.5-7B proportions (head dim 128, MHA, FFN 11008/4096 x width, CLIP at 336 px /
  patch 14 = 576 tokens per image) at a CPU-sized LLM width and depth. The tower is scaled by
  the same width and depth factors, so that it keeps its share of the prefill."""
  base = eem.ModelConfig.preset("llava-1.5-7b")
  llm = base.llm.replace(width=width, depth=layers, num_heads=width // 128, num_kv_heads=width // 128,
                         mlp_dim=round(width * 11008 / 4096), vocab_size=vocab or base.llm.vocab_size)
  w, d = width / base.llm.width, layers / base.llm.depth
  vision = base.vision.replace(width=round(1024 * w), num_heads=max(1, round(16 * w)), mlp_dim=round(4096 * w),
                               depth=max(2, round(24 * d)))
  return base.replace(llm=llm, vision=vision)


def torch_llm(cfg: eem.ModelConfig):
  """transformers' LlamaForCausalLM (the LLaVA decoder, SDPA attention) of `cfg.llm`'s shape,
  random weights (seed 0), in eval mode on the CPU in float32."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  c = cfg.llm
  text = transformers.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.width, intermediate_size=c.mlp_dim,
                                  num_hidden_layers=c.depth, num_attention_heads=c.num_heads,
                                  num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
                                  rope_theta=c.rope_theta, attn_implementation="sdpa")
  torch.manual_seed(0)
  return transformers.LlamaForCausalLM(text).eval()


def images_then_text(cfg, *, batch: int, num_images: int, text_len: int, seed: int = 0) -> batch_lib.Batch:
  """`batch` identical-shape rows: `num_images` images at positions [0, V), then the prompt."""
  return batch_lib.from_plans(cfg, [["img"] * num_images + [text_len]] * batch, seed=seed)


def median_ms(fn, *args, repeats: int) -> float:
  """Median wall milliseconds of `repeats` calls after one warmup (compile) call, each ended
  by block_until_ready."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times)) * 1e3
