"""Prefill time and analytic FLOPs of the token-reduction settings (FastV, VisionZip, EE-MLLM-F and
their combination) at a width-scaled LLaVA-1.5-7B shape, random weights, one image + 64 text tokens.

    python benchmarks/reduction_prefill.py [--width 512 --layers 4 --repeats 9]
"""

import argparse

import jax

import ee_mllm_jax as eem
from common import images_then_text, median_ms, scaled_llava
from ee_mllm_jax import flops
from ee_mllm_jax.batch import model_inputs
from ee_mllm_jax.generate import prefill

SETTINGS = {"LLaVA": {}, "FastV K=2 R=0%": dict(fastv_layer=2, fastv_ratio=0.0),
            "FastV K=2 R=50%": dict(fastv_layer=2, fastv_ratio=0.5),
            "VisionZip 54+10": dict(visionzip_dominant=54, visionzip_contextual=10),
            "EE-MLLM-F": dict(attention="composite"),
            "EE-MLLM-F + FastV K=2 R=50%": dict(attention="composite", fastv_layer=2, fastv_ratio=0.5)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--width", type=int, default=512)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=9)
  args = parser.parse_args()
  base = scaled_llava(args.width, args.layers, vocab=4096)
  example = model_inputs(images_then_text(base, batch=1, num_images=1, text_len=64))
  params = jax.jit(lambda k: eem.EEMLLM(base).init(k, **example)["params"])(jax.random.key(0))
  ref = None
  for name, flags in SETTINGS.items():
    cfg = base.run_as(**flags)
    batch = model_inputs(images_then_text(cfg, batch=1, num_images=1, text_len=64))
    ms = median_ms(lambda p, b, cfg=cfg: prefill(p, cfg, b)[0], params, batch, repeats=args.repeats)
    total = flops.forward_flops(cfg, batch=1, num_images=1, text_len=64)["total"]
    ref = ref or (ms, total)
    print(f"{name:30s} prefill {ms:7.1f} ms ({ref[0] / ms:.2f}x)  analytic FLOPs saved {1 - total / ref[1]:6.1%}")


if __name__ == "__main__":
  main()
