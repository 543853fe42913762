"""The speed table of benchmarks/data_efficiency.py: time to first token and analytic FLOPs of the
three modes at several image sizes, one random parameter set per shape (Flamingo's extra blocks
fresh). Rows are cached per backend and shape under the experiment's work directory.
"""

from __future__ import annotations

import json
import os
import time

import flax.linen as nn
import jax

import ee_mllm_jax as eem
from common import images_then_text, median_ms, scaled_llava
from ee_mllm_jax import batch as batch_lib
from ee_mllm_jax import flops as flops_lib
from ee_mllm_jax import params as params_lib
from ee_mllm_jax import storage
from ee_mllm_jax.generate import prefill, sample_token


def cached(path: str, fn) -> dict:
  """{"value": fn(), "seconds": its wall time}, computed once and kept at `path` (JSON)."""
  if not os.path.exists(path):
    t0 = time.perf_counter()
    value = fn()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    storage.atomic_write(path, json.dumps(dict(value=value, seconds=time.perf_counter() - t0)))
  with open(path) as f:
    return json.load(f)


def measure(base: eem.ModelConfig, image_sizes, modes: dict, *, text_len: int, repeats: int,
            label: str) -> list[dict]:
  """Prefill (tower + projector + LLM + first token) time and analytic FLOPs of the three modes,
  one image of each size, on one random parameter set (Flamingo's extra blocks fresh)."""
  rows = []
  for size in image_sizes:
    shape = base.replace(vision=base.vision.replace(image_size=size))
    v = shape.tokens_per_image
    flamingo = dict(cross_every=4 if shape.llm.depth % 4 == 0 else shape.llm.depth, resampler_latents=64,
                    resampler_depth=6)
    cfgs = {m: shape.replace(mode=modes[m], **(flamingo if m == "flamingo" else {})) for m in modes}
    batch = jax.device_put(batch_lib.model_inputs(images_then_text(shape, batch=1, num_images=1, text_len=text_len)))
    params = None
    for mode, cfg in cfgs.items():
      fresh = jax.jit(eem.EEMLLM(cfg).init)(jax.random.key(0), **batch_lib.example(cfg))["params"]
      fresh = nn.meta.unbox(fresh)
      if params is None:
        params = fresh
      p = params_lib.overlay(fresh, params)[0] if mode == "flamingo" else params

      def first_token(p=p, cfg=cfg):
        logits, _ = prefill(p, cfg, batch, cache_size=batch_lib.prefill_slots(cfg, batch))
        return sample_token(logits, None)

      seconds = median_ms(first_token, repeats=repeats) / 1e3
      rows.append(dict(shape=label, image_size=size, v=v, mode=mode, seconds=seconds,
                       flops=flops_lib.forward_flops(cfg, batch=1, num_images=1, text_len=text_len)["total"]))
      print(f"speed {label} {size}px V={v} {mode}: {seconds * 1e3:.1f} ms, "
            f"{rows[-1]['flops'] / 1e9:.1f} GFLOP", flush=True)
      del fresh
    del params
  return rows


def reduction_rows(args, scale, work: str) -> tuple[list[dict], float]:
  """The training-free settings' prefill at the width-scaled 7B shape (`reduction_prefill`, 576
  tokens per image; cached per backend) and the seconds they took to measure."""
  if args.skip_speed:
    return [], 0.0
  import frontier  # pylint: disable=g-import-not-at-top
  import reduction_prefill  # pylint: disable=g-import-not-at-top
  label = f"reductions, scaled LLaVA-1.5-7B (width {scale.speed_width}, {scale.speed_layers} layers), f32"
  flag_sets = reduction_prefill.settings(scale.llm["depth"])
  table = cached(os.path.join(work, "speed", f"{jax.default_backend()}_{label}.json"),
                 lambda: reduction_prefill.measure(flag_sets, width=scale.speed_width, layers=scale.speed_layers,
                                                   repeats=args.speed_repeats))
  return frontier.speed_rows({k: tuple(v) for k, v in table["value"].items()}), table["seconds"]


def rows(args, scale, work: str, modes: dict) -> tuple[list[dict], float]:
  """The speed table's rows (cached per backend and shape) and the seconds they took to measure."""
  if args.skip_speed:
    return [], 0.0
  tables = [(f"scaled LLaVA-1.5-7B (width {scale.speed_width}, {scale.speed_layers} layers), f32",
             scaled_llava(scale.speed_width, scale.speed_layers, 4096), scale.speed_image_sizes, scale.speed_text)]
  if args.preset:
    tables.append((f"{args.preset}, bf16", eem.ModelConfig.preset(args.preset, dtype="bfloat16",
                                                                  param_dtype="bfloat16"), (336, 448, 672), 64))
  out, seconds = [], 0.0
  for label, cfg, sizes, text in tables:
    table = cached(os.path.join(work, "speed", f"{jax.default_backend()}_{label}.json"),
                   lambda: measure(cfg, sizes, modes, text_len=text, repeats=args.speed_repeats, label=label))
    out += table["value"]
    seconds += table["seconds"]
  return out, seconds
