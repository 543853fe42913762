"""Prefill and decode speed vs number of visual tokens: LLaVA (self) vs EE-MLLM (composite) vs
Flamingo (cross).

One process, one random parameter set shared by every mode (LLaVA-shaped; EE-MLLM-F runs it in
composite mode with the visual FFN, EE-MLLM without; Flamingo adds its cross-attention blocks
every 4 layers and a 64-latent, 6-layer perceiver resampler, as configs/flamingo_7b.py, whose
cache holds text slots only plus each block's media keys/values). For each V (a multiple of the tokens per
image: V / P images, then `--text_len` prompt tokens) and each mode it measures

* TTFT: vision tower + projector + LLM prefill + first token (median of `--repeats` timed runs
  after a warmup/compile run, each ended by block_until_ready), with the analytic FLOPs of
  `ee_mllm_jax.flops.forward_flops` (which counts the LM head on every prompt token; the prefill
  runs it on the last one only, a negligible difference);
* decode: `--new_tokens - 1` cached steps, tokens/s over the batch, and `decode_step_flops`
  over the whole fixed-size cache (masked slots are computed too).

It prints a table and the fitted log-log slopes of TTFT vs V, and writes a log-log plot.

CPU (default): a width-scaled LLaVA-1.5-7B shape (head dim 128, FFN 2.69 x width, CLIP at
336 px / patch 14 = 576 tokens per image, tower scaled like the LLM: benchmarks/common.py), float32:
    python benchmarks/resolution.py
GPU: the real shape in bfloat16:
    python benchmarks/resolution.py --preset llava-1.5-7b
"""

from __future__ import annotations

import argparse
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import ee_mllm_jax as eem
from ee_mllm_jax.flops import decode_step_flops, forward_flops
from common import images_then_text, median_ms, scaled_llava
from ee_mllm_jax import batch as batch_lib
from ee_mllm_jax.generate import decode, prefill, sample_token
from ee_mllm_jax.mode import Composite, Cross, Self
from ee_mllm_jax.params import overlay

MODES = {"self": Self(),  # LLaVA
         "ee-mllm": Composite(visual_ffn=False),
         "ee-mllm-f": Composite(visual_ffn=True),  # on the self model's weights
         "flamingo": Cross(every=4, resampler_latents=64, resampler_depth=6)}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default=None, help="a ModelConfig preset run as is in bfloat16 (e.g. llava-1.5-7b); "
                                                "default: the width-scaled CPU shape below, float32")
  p.add_argument("--width", type=int, default=512, help="LLM width of the scaled shape")
  p.add_argument("--layers", type=int, default=4, help="LLM layers of the scaled shape")
  p.add_argument("--vocab", type=int, default=4096)
  p.add_argument("--dtype", default=None, help="compute/param dtype (default: float32 scaled, bfloat16 preset)")
  p.add_argument("--visual_tokens", default="576,1152,2304,2880,4608")
  p.add_argument("--modes", default="self,ee-mllm,ee-mllm-f,flamingo")
  p.add_argument("--text_len", type=int, default=64, help="prompt tokens after the images")
  p.add_argument("--new_tokens", type=int, default=16)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--plot", default="benchmarks/out/resolution.png")
  return p.parse_args(argv)


def log_log_slope(xs, ys) -> float:
  return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def main(argv=None):
  args = parse_args(argv)
  if args.preset:
    dtype = args.dtype or "bfloat16"
    base = eem.ModelConfig.preset(args.preset)
  else:
    dtype = args.dtype or "float32"
    base = scaled_llava(args.width, args.layers, args.vocab)
  base = base.replace(dtype=dtype, param_dtype=dtype)
  p = base.tokens_per_image
  visual_tokens = [int(v) for v in args.visual_tokens.split(",")]
  if any(v % p for v in visual_tokens):
    raise SystemExit(f"every V must be a multiple of the {p} tokens per image")
  modes = args.modes.split(",")
  b, t, n = args.batch, args.text_len, args.new_tokens
  c = base.llm
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), dtype {dtype}")
  print(f"LLM: width {c.width}, layers {c.depth}, heads {c.num_heads}x{c.head_dim}, FFN {c.mlp_dim}, "
        f"vocab {c.vocab_size}; tower: width {base.vision.width}, {base.vision.num_layers_run} layers, "
        f"{p} tokens/image; batch {b}, prompt {t} text tokens, {n} new tokens, median of {args.repeats}")

  params = jax.jit(eem.EEMLLM(base.replace(mode=MODES["self"])).init)(jax.random.key(0), **batch_lib.example(base))["params"]
  params = jax.block_until_ready(nn.meta.unbox(params))
  if "flamingo" in modes:  # the same LLM, tower and projector, plus the cross blocks and resampler
    cross_cfg = base.replace(mode=MODES["flamingo"])
    fresh = jax.jit(eem.EEMLLM(cross_cfg).init)(jax.random.key(1), **batch_lib.example(cross_cfg))["params"]
    cross_params = jax.block_until_ready(overlay(nn.meta.unbox(fresh), params)[0])

  rows = []
  header = (f"{'V':>5} {'mode':>9} | {'prefill GFLOP':>13} {'TTFT ms':>9} {'GFLOP/s':>8} {'vs self':>7} | "
            f"{'decode tok/s':>12} {'step GFLOP':>10}")
  print(header + "\n" + "-" * len(header))
  for v in visual_tokens:
    batch = jax.device_put(batch_lib.model_inputs(images_then_text(base, batch=b, num_images=v // p, text_len=t)))
    # (TTFT excludes the host-to-device copy)
    next_pos = jnp.full((b,), v + t, jnp.int32)
    ttft_self = None
    for mode in modes:
      cfg = base.replace(mode=MODES[mode])
      p_mode = cross_params if mode == "flamingo" else params
      slots = batch_lib.prefill_slots(cfg, batch) + n - 1

      def first_token():
        logits, cache = prefill(p_mode, cfg, batch, cache_size=slots)
        return sample_token(logits, None), logits, cache

      ttft = median_ms(lambda: first_token()[0], repeats=args.repeats) / 1e3
      _, logits, cache = first_token()
      step = median_ms(lambda: decode(p_mode, cfg, logits, cache, next_pos, max_new_tokens=n).tokens,
                       repeats=args.repeats) / 1e3
      flops = forward_flops(cfg, batch=b, num_images=v // p, text_len=t)["total"]
      step_flops = decode_step_flops(cfg, cache_len=slots, batch=b, media_len=v // p * cfg.media_tokens_per_image)
      tok_s = b * (n - 1) / step
      ttft_self = ttft if mode == "self" else ttft_self
      ratio = f"{ttft_self / ttft:6.2f}x" if ttft_self else "      -"
      rows.append(dict(v=v, mode=mode, ttft=ttft, flops=flops, tok_s=tok_s))
      print(f"{v:>5} {mode:>9} | {flops / 1e9:>13.1f} {ttft * 1e3:>9.1f} {flops / ttft / 1e9:>8.1f} {ratio:>7} | "
            f"{tok_s:>12.1f} {step_flops / 1e9:>10.3f}", flush=True)
      del cache, logits

  print("\nlog-log slope of TTFT vs V (1 = linear; attention over all tokens pushes toward 2):")
  slopes = {}
  for mode in modes:
    r = [x for x in rows if x["mode"] == mode]
    vs = [x["v"] for x in r]
    slopes[mode] = log_log_slope(vs, [x["ttft"] for x in r])
    tail = log_log_slope(vs[-2:], [x["ttft"] for x in r[-2:]]) if len(r) > 2 else float("nan")
    print(f"  {mode:>9}: measured {slopes[mode]:.2f} (last two points {tail:.2f}), "
          f"analytic FLOPs {log_log_slope(vs, [x['flops'] for x in r]):.2f}")
  if args.plot:
    plot(rows, modes, slopes, args.plot, title=f"{args.preset or 'scaled LLaVA-1.5-7B shape'}, "
                                               f"{jax.devices()[0].device_kind}, {dtype}, T={t}")


def plot(rows, modes, slopes, path, title):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  out_dir = os.path.dirname(path)
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
    ignore = os.path.join(out_dir, ".gitignore")
    if out_dir.endswith(os.path.join("benchmarks", "out")) and not os.path.exists(ignore):
      with open(ignore, "w") as f:
        f.write("*\n")  # benchmark outputs stay out of git
  fig, ax = plt.subplots(figsize=(6, 4.5))
  for mode in modes:
    r = [x for x in rows if x["mode"] == mode]
    ax.plot([x["v"] for x in r], [x["ttft"] * 1e3 for x in r], "o-", label=f"{mode} (slope {slopes[mode]:.2f})")
  ax.set_xscale("log")
  ax.set_yscale("log")
  vs = sorted({x["v"] for x in rows})
  ax.set_xticks(vs, [str(v) for v in vs], minor=False)
  ax.minorticks_off()
  ax.set_xlabel("visual tokens V")
  ax.set_ylabel("time to first token (ms)")
  ax.set_title(title, fontsize=9)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  print(f"plot: {path}")


if __name__ == "__main__":
  main()
