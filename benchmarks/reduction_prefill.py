"""Prefill time and analytic FLOPs of the training-free settings (the frontier's: FastV, VisionZip,
EE-MLLM-F and their combinations, `frontier.settings`) at a width-scaled LLaVA-1.5-7B shape (576
tokens per image), random weights, one image + 64 text tokens; times are medians, in one run.

    python benchmarks/reduction_prefill.py [--width 512 --layers 4 --repeats 9]
"""

import argparse

import jax

import ee_mllm_jax as eem
import frontier
from common import images_then_text, median_ms, scaled_llava
from ee_mllm_jax import flops
from ee_mllm_jax.batch import model_inputs
from ee_mllm_jax.generate import prefill


def settings(depth: int, tokens: int = 576) -> dict[str, dict]:
  """{name: run_as overrides}: LLaVA itself, every frontier setting (named for an LLM of `depth`
  layers), and EE-MLLM-F from layer 0."""
  out = {"LLaVA": {}}
  out.update({f"{m}: {s}": f for m, s, f in frontier.settings(depth, tokens)})
  for ffn in (True, False):
    out[frontier.ee_f_name(0, ffn)] = dict(attention="composite", visual_ffn=ffn)
  return out


def measure(flag_sets: dict[str, dict], *, width: int, layers: int, repeats: int) -> dict[str, tuple[float, float]]:
  """{name: (median prefill ms, analytic FLOPs)} of each setting of one random width-scaled model."""
  base = scaled_llava(width, layers, vocab=4096)
  example = model_inputs(images_then_text(base, batch=1, num_images=1, text_len=64))
  params = jax.jit(lambda k: eem.EEMLLM(base).init(k, **example)["params"])(jax.random.key(0))
  out = {}
  for name, flags in flag_sets.items():
    cfg = base.run_as(**flags)
    batch = model_inputs(images_then_text(cfg, batch=1, num_images=1, text_len=64))
    ms = median_ms(lambda p, b, cfg=cfg: prefill(p, cfg, b)[0], params, batch, repeats=repeats)
    out[name] = (ms, flops.forward_flops(cfg, batch=1, num_images=1, text_len=64)["total"])
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--width", type=int, default=512)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=9)
  args = parser.parse_args()
  got = measure(settings(args.layers), width=args.width, layers=args.layers, repeats=args.repeats)
  ms0, f0 = got["LLaVA"]
  for name, (ms, total) in got.items():
    print(f"{name:55s} prefill {ms:7.1f} ms ({ms0 / ms:.2f}x)  analytic FLOPs saved {1 - total / f0:6.1%}")


if __name__ == "__main__":
  main()
