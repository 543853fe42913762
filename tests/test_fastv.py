"""FastV (models/reduction.py): R = 0 is no pruning bit for bit, R > 0 is a naive float64 model
that deletes the same tokens, the ranking is FastV's rule by hand, the layers after K run on the
smaller visual length, cached generation equals full forwards, and the setting travels with the
mode's flags."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ee_mllm_jax as eem
from batches import MIXED_PLANS, make_batch
from jaxpr_shapes import shapes_in_jaxpr
from models import assert_cached_generation_equals_full_forwards, forward, greedy_by_full_forward, init_params
from reference import naive_llm_logits
from test_model import assert_close_on_valid, naive_logits
from ee_mllm_jax.batch import model_inputs
from ee_mllm_jax.generate import prefill_prefix, split_at_last_image
from ee_mllm_jax.models.reduction import fastv_order, received_attention

# (attention flags) of LLaVA, EE-MLLM-F and EE-MLLM-F with a layer schedule, on self-trained weights
SETTINGS = {"self": dict(attention="self"), "ee-mllm-f": dict(attention="composite"),
            "schedule": dict(attention="composite", composite_from_layer=1)}


def llava(depth=3):
  base = eem.ModelConfig.preset("tiny", attention="self")
  return base.replace(llm=base.llm.replace(depth=depth))


def run_as(setting, **reduction):
  return llava().run_as(**SETTINGS[setting], **reduction)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_ratio_zero_equals_no_pruning_bit_for_bit(setting):
  plain = run_as(setting)
  cfg = run_as(setting, fastv_layer=2, fastv_ratio=0.0)
  batch, params = make_batch(cfg, MIXED_PLANS), init_params(plain)
  np.testing.assert_array_equal(np.asarray(forward(cfg, params, batch)), np.asarray(forward(plain, params, batch)))


@pytest.mark.parametrize("setting,layer", [("self", 1), ("self", 2), ("ee-mllm-f", 2), ("schedule", 1),
                                           ("schedule", 2)])
def test_pruning_equals_naive_float64_model_that_deletes_the_tokens(setting, layer):
  cfg = run_as(setting, fastv_layer=layer, fastv_ratio=0.5)
  batch, params = make_batch(cfg, MIXED_PLANS), init_params(cfg)
  got = forward(cfg, params, batch)
  assert_close_on_valid(got, naive_logits(cfg, params, batch), batch["text_valid"], 1e-5)
  # guard: pruning changes the logits (else the comparison above checks nothing new)
  plain = forward(run_as(setting), params, batch)
  assert np.max(np.abs(np.asarray(got - plain))[batch["text_valid"]]) > 1e-3


def test_naive_model_keeps_valid_tokens_first():
  """The reference's own ranking keeps every valid visual token of a row with few of them (the
  model's `fastv_order` rule: padding never beats a valid token)."""
  cfg = run_as("self", fastv_layer=1, fastv_ratio=0.25)
  batch, params = make_batch(cfg, MIXED_PLANS), init_params(cfg)
  from models import embed_image
  from ee_mllm_jax.batch import visual_valid
  valid_v = visual_valid(batch["image_valid"], batch["visual_positions"].shape[1])
  kept = []
  naive_llm_logits(params["llm"], cfg, embed_image(cfg, params, batch["pixel_values"]), batch["input_ids"],
                   batch["visual_positions"], batch["text_positions"], valid_v, batch["text_valid"], kept)
  for row in range(len(MIXED_PLANS)):
    n = int(valid_v[row].sum())
    assert np.asarray(valid_v[row])[kept[0][row]].sum() == min(n, kept[0].shape[1])


def test_ranking_by_hand():
  """One head of dim 2, q = (sqrt 2, 0), keys (a_j, 0): the weights are softmax(a). Three visual
  keys a = (log 3, 0, log 2) at positions 0-2, a text key (a = 0) at 3; one text query at 3
  (valid, ranks), one at 4 (not ranking). Weights 3/7, 1/7, 2/7, 1/7: scores (3/7, 1/7, 2/7)."""
  q = jnp.array([[[[math.sqrt(2), 0.0]], [[5.0, 0.0]]]])  # (B, Q, N, H)
  k = jnp.array([[[[math.log(3), 0.0]], [[0.0, 0.0]], [[math.log(2), 0.0]], [[0.0, 0.0]], [[0.0, 0.0]]]])
  pos = jnp.arange(5)[None]
  scores = received_attention(q, k, pos[:, 3:], jnp.array([[True, False]]), pos, jnp.ones((1, 5), bool), 3)
  np.testing.assert_allclose(np.asarray(scores), [[3 / 7, 1 / 7, 2 / 7]], rtol=1e-6)
  # keep 2 of 3: tokens 0 and 2, in order, then the dropped one
  np.testing.assert_array_equal(np.asarray(fastv_order(scores, jnp.ones((1, 3), bool), 2)), [[0, 2, 1]])
  # token 2 is padding: never kept over a valid token, whatever its score
  np.testing.assert_array_equal(np.asarray(fastv_order(scores, jnp.array([[True, True, False]]), 2)), [[0, 1, 2]])


@pytest.mark.parametrize("setting", ["self", "ee-mllm-f"])
def test_layers_after_k_run_on_the_reduced_visual_length(setting):
  """With dense ("xla") attention, the self layers after K score (V' + T) x (V' + T) and the
  visual stream is (B, V', D); masking a full-size array instead would show neither shape."""
  cfg = run_as(setting, fastv_layer=1, fastv_ratio=0.5).with_attention_impl("xla")
  batch = model_inputs(make_batch(cfg, MIXED_PLANS))
  params = init_params(cfg)
  b, t, v = batch["input_ids"].shape[0], batch["input_ids"].shape[1], batch["visual_positions"].shape[1]
  kept = cfg.mode.fastv_kept(v)
  assert kept == math.ceil(v / 2) < v
  jaxpr = jax.make_jaxpr(lambda p, x: eem.EEMLLM(cfg).apply({"params": p}, **x))(params, batch).jaxpr
  shapes = shapes_in_jaxpr(jaxpr)
  assert (b, kept, cfg.llm.width) in shapes
  kv, g = cfg.llm.num_kv_heads, cfg.llm.num_heads // cfg.llm.num_kv_heads
  queries = kept + t if setting == "self" else t
  assert (b, kv, g, queries, kept + t) in shapes
  # every layer from K: its FFN runs on V' + T (self) or V' + T with the visual FFN (EE-MLLM-F)
  assert (b, kept, cfg.llm.mlp_dim) in shapes


SETTINGS_GEN = {"self": dict(attention="self", fastv_layer=1),
                "ee-mllm-f": dict(attention="composite", fastv_layer=2),
                "schedule": dict(attention="composite", composite_from_layer=1, fastv_layer=2)}


@pytest.mark.parametrize("setting", list(SETTINGS_GEN))
def test_cached_greedy_generation_equals_repeated_full_forwards(setting):
  """The prefill ranks by the prompt; the full forwards rank by the prompt too (`rank_text`)."""
  cfg = llava().run_as(**SETTINGS_GEN[setting], fastv_ratio=0.5)
  assert_cached_generation_equals_full_forwards(cfg, make_batch(cfg, MIXED_PLANS))


def test_setting_is_named_and_travels_with_the_flags():
  cfg = llava().run_as(attention="composite", fastv_layer=2, fastv_ratio=0.5)
  assert cfg.mode_name.startswith("EE-MLLM-F") and cfg.mode_name.endswith("+ FastV K=2 R=50%")
  assert eem.ModelConfig.from_dict(cfg.to_dict()) == cfg
  assert cfg.replace(fastv_ratio=0.25).mode.fastv_ratio == 0.25
  assert cfg.replace(attention="self").mode.fastv_layer == 2  # a mode switch keeps the reduction
  for bad in (dict(fastv_layer=3), dict(fastv_ratio=1.0), dict(fastv_layer=-1)):
    with pytest.raises(ValueError, match=next(iter(bad))):
      cfg.replace(**bad)
  # an export with a reduction is not stock LLaVA (the PyTorch port runs it: tests/test_torch_reduction.py)
  from ee_mllm_jax.mode import Self, hf_model_type
  assert hf_model_type(Self(fastv_layer=1), Self()) == "ee_mllm" and hf_model_type(Self(), Self()) == "llava"
  with pytest.raises(ValueError, match="FastV and VisionZip"):
    eem.ModelConfig.preset("tiny", attention="cross", cross_every=1, fastv_layer=1)


def test_prefix_reuse_ranks_by_the_prefix():
  """A cached image prefix is ranked by the prefix's queries (the system text before the image):
  generation from it equals full forwards that rank by those text tokens alone."""
  cfg = llava().run_as(**SETTINGS_GEN["ee-mllm-f"], fastv_ratio=0.5)
  batch, params = make_batch(cfg, MIXED_PLANS), init_params(cfg)
  prefix, rest = split_at_last_image(batch)
  reused = eem.generate(params, cfg, rest, cache=prefill_prefix(params, cfg, prefix), max_new_tokens=4)
  last_image = np.max(np.where(batch["image_valid"][:, :, None], batch["visual_positions"].reshape(
      len(MIXED_PLANS), 2, -1), -1), axis=(1, 2))
  before = batch["text_valid"] & (batch["text_positions"] < last_image[:, None])
  want, _ = greedy_by_full_forward(cfg, params, batch, 4, rank=before)
  np.testing.assert_array_equal(np.asarray(reused.tokens), want)
