"""Analytic FLOPs (flops.py) of FastV and VisionZip agree with XLA's count of the compiled forward,
and the reductions save what they should."""

import jax
import numpy as np
import pytest

import ee_mllm_jax as eem
from batches import make_batch
from test_flops import xla_flops, xla_layer_flops
from ee_mllm_jax import flops
from ee_mllm_jax.batch import model_inputs
from ee_mllm_jax.models.llm import DecoderLayer, ForwardContext, Streams
from ee_mllm_jax.models.reduction import segments
from ee_mllm_jax.models.vision import VisionLayer

SETTINGS = {
    "self+fastv": dict(attention="self", fastv_layer=1, fastv_ratio=0.5),
    "ee-mllm-f+fastv": dict(attention="composite", fastv_layer=2, fastv_ratio=0.75),
    "schedule+fastv": dict(attention="composite", composite_from_layer=1, fastv_layer=2, fastv_ratio=0.5),
    "visionzip": dict(attention="self", visionzip_dominant=8, visionzip_contextual=4),
    "schedule+visionzip": dict(attention="composite", composite_from_layer=2, visionzip_dominant=10,
                               visionzip_contextual=2),
    "ee-mllm-f+visionzip+fastv": dict(attention="composite", visionzip_dominant=8, visionzip_contextual=4,
                                      fastv_layer=1, fastv_ratio=0.5),
}


def config(preset, **flags):
  base = eem.ModelConfig.preset(preset, attention="self")
  return base.replace(llm=base.llm.replace(depth=4)).run_as(**flags)


def scanned_rest(cfg, batch):
  """XLA charges a loop body once: the (n - 1) layers of each scan it leaves out, compiled alone
  (the tower's plain scan, then each of `segments`' runs at its visual length)."""
  vc, c = cfg.vision, cfg.llm
  (b, t), v = batch["input_ids"].shape, batch["visual_positions"].shape[1]
  plain_tower = vc.num_layers_run - (1 if cfg.mode.visionzip else 0)
  x_img = np.zeros((b * 2, vc.num_patches + vc.class_token, vc.width), np.float32)
  total = max(plain_tower - 1, 0) * xla_layer_flops(VisionLayer(vc), x_img)
  for kind, count, scores in segments(cfg.mode, c.depth):
    ctx = ForwardContext(pos_v=np.arange(v)[None].repeat(b, 0), pos_t=batch["text_positions"],
                         valid_v=np.ones((b, v), bool), valid_t=batch["text_valid"])
    carry = Streams(x_v=np.zeros((b, v, c.width), np.float32), x_t=np.zeros((b, t, c.width), np.float32))
    total += (count - 1) * xla_layer_flops(DecoderLayer(c, kind, cfg.mode.visual_ffn_in(kind)), carry, None, ctx)
    if scores:
      v = cfg.mode.fastv_kept(v)
  return total


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_analytic_forward_flops_match_xla(setting):
  cfg = config("demo", **SETTINGS[setting])
  batch = model_inputs(make_batch(cfg, [[3, "img", 40, "img", 20]] * 2))
  b, t = batch["input_ids"].shape
  model = eem.EEMLLM(cfg)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), **batch))
  total = xla_flops(lambda p, x: model.apply(p, **x), params, batch) + scanned_rest(cfg, batch)
  analytic = flops.forward_flops(cfg, batch=b, num_images=2, text_len=t)
  # XLA also counts norms, RoPE, activations and the ranking's averages, which the analytic count leaves out
  # (+); with dense attention it may merge the ranking's scores with the layer's own identical product
  # (common subexpressions: -1.7% at most here, the whole `fastv_ranking` share), which a fused kernel cannot
  slack = analytic.get("fastv_ranking", 0) / analytic["total"]
  assert -slack <= total / analytic["total"] - 1 < 0.03, f"XLA {total:.4g} vs analytic {analytic['total']:.4g}"
  assert ("fastv_ranking" in analytic) == cfg.mode.fastv and ("visionzip" in analytic) == cfg.mode.visionzip
  print(f"{setting}: XLA/analytic = {total / analytic['total']:.3f}")


def test_reductions_cut_the_decoder_flops():
  cfg = eem.ModelConfig.preset("llava-1.5-7b")
  llm = lambda c: flops.forward_flops(c, batch=1, num_images=1, text_len=64)
  plain = llm(cfg)["total"]
  fastv = llm(cfg.run_as(fastv_layer=2, fastv_ratio=0.5))["total"]
  zipped = llm(cfg.run_as(visionzip_dominant=54, visionzip_contextual=10))["total"]
  # FastV K=2 R=50% on LLaVA-1.5: the paper's ~45% cut (the tower is the same: a bit less here)
  assert 0.35 < 1 - fastv / plain < 0.5
  assert zipped < fastv < plain
