"""Core model properties: both modes equal the naive full-sequence form; EE-MLLM-F; shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ee_mllm_jax as eem
from batches import MIXED_PLANS, make_batch
from jaxpr_shapes import shapes_in_jaxpr
from models import embed_image, forward, init_params
from reference import naive_llm_logits
from ee_mllm_jax.batch import model_inputs, visual_valid
from ee_mllm_jax.params import abstract_params

def naive_logits(cfg, params, batch):
  x_v = embed_image(cfg, params, batch["pixel_values"])
  valid_v = visual_valid(batch["image_valid"], batch["visual_positions"].shape[1])
  return naive_llm_logits(params["llm"], cfg, x_v, batch["input_ids"], batch["visual_positions"],
                          batch["text_positions"], valid_v, batch["text_valid"])


def assert_close_on_valid(got, want, valid, tol):
  got, want = np.asarray(got, np.float64)[valid], np.asarray(want)[valid]
  err = np.max(np.abs(got - want)) / np.max(np.abs(want))
  assert err < tol, f"max relative error {err:.2e}"


@pytest.mark.parametrize("attention,visual_ffn", [("composite", False), ("composite", True), ("self", True)])
def test_two_stream_model_equals_naive_full_sequence(attention, visual_ffn):
  cfg = eem.ModelConfig.preset("tiny", attention=attention, visual_ffn=visual_ffn)
  batch = make_batch(cfg, MIXED_PLANS)
  params = init_params(cfg)
  # Random (non-unit) norm scales so that a missing or misplaced norm cannot pass.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x * (1 + 0.3 * jax.random.normal(jax.random.key(len(str(path))), x.shape))
      if "scale" in str(path) else x, params)
  got = forward(cfg, params, batch)
  assert got.shape == batch["input_ids"].shape + (cfg.llm.vocab_size,)
  assert_close_on_valid(got, naive_logits(cfg, params, batch), batch["text_valid"], 1e-5)


def test_modes_differ_and_visual_ffn_matters():
  """Guards the test above: the three variants really compute different functions."""
  base = eem.ModelConfig.preset("tiny")
  batch = make_batch(base, MIXED_PLANS)
  params = init_params(base)
  outs = [forward(base.replace(attention=a, visual_ffn=f), params, batch)
          for a, f in [("composite", False), ("composite", True), ("self", True)]]
  valid = batch["text_valid"]
  for i in range(3):
    for j in range(i + 1, 3):
      assert np.max(np.abs(np.asarray(outs[i] - outs[j])[valid])) > 1e-4


def test_stream_order_does_not_matter():
  """Only positions matter: permuting tokens within each stream permutes the logits."""
  cfg = eem.ModelConfig.preset("tiny")
  batch = make_batch(cfg, MIXED_PLANS)
  params = init_params(cfg)
  perm = np.random.default_rng(1).permutation(batch["input_ids"].shape[1])
  shuffled = dict(batch, **{k: batch[k][:, perm] for k in ("input_ids", "text_positions", "text_valid")})
  a = forward(cfg, params, batch)
  b = forward(cfg, params, shuffled)
  assert_close_on_valid(np.asarray(b), np.asarray(a)[:, perm], shuffled["text_valid"], 1e-5)


@pytest.mark.parametrize("attention", ["self", "composite"])
def test_ee_mllm_f_image_dependence(attention):
  """One parameter set (trained as LLaVA) runs in both modes: text after the image depends on
  it, text before it (a system prompt) does not."""
  llava = eem.ModelConfig.preset("tiny", attention="self", visual_ffn=True)
  cfg = llava.replace(attention=attention)
  batch = make_batch(llava, [[4, "img", 6], [4, "img", 6]])
  params = init_params(llava)  # same params for both modes
  other = dict(batch, pixel_values=batch["pixel_values"][::-1].copy())  # swap the two images
  a = np.asarray(forward(cfg, params, batch))
  b = np.asarray(forward(cfg, params, other))
  np.testing.assert_allclose(a[:, :4], b[:, :4], rtol=0, atol=1e-6)  # system prompt: blind to it
  assert np.min(np.max(np.abs(a[:, 4:10] - b[:, 4:10]), axis=-1)) > 1e-4  # every later token sees it


def test_padding_is_inert():
  """Padded text tokens, their ids and absent images' pixels change no valid logit."""
  cfg = eem.ModelConfig.preset("tiny")
  batch = make_batch(cfg, MIXED_PLANS)
  params = init_params(cfg)
  noisy = dict(batch)
  rng = np.random.default_rng(7)
  noisy["input_ids"] = np.where(batch["text_valid"], batch["input_ids"],
                                rng.integers(0, cfg.llm.vocab_size, batch["input_ids"].shape)).astype(np.int32)
  absent = ~batch["image_valid"][:, :, None, None, None]
  noisy["pixel_values"] = np.where(absent, 100 * rng.standard_normal(batch["pixel_values"].shape),
                                   batch["pixel_values"]).astype(np.float32)
  a = forward(cfg, params, batch)
  b = forward(cfg, params, noisy)
  assert_close_on_valid(b, np.asarray(a), batch["text_valid"], 1e-6)


@pytest.mark.parametrize("attention,visual_ffn", [("composite", False), ("composite", True), ("self", True)])
def test_composite_does_not_compute_what_it_drops(attention, visual_ffn):
  """No visual query projection, no V x V scores, no visual FFN unless visual_ffn."""
  cfg = eem.ModelConfig.preset("tiny", attention=attention, visual_ffn=visual_ffn)
  batch = make_batch(cfg, [[3, "img", 5, "img", 4]] * 2)  # V = 32, T = 13, S = 45
  params = init_params(cfg)
  model_batch = model_inputs(batch)
  jaxpr = jax.make_jaxpr(lambda p: eem.EEMLLM(cfg).apply({"params": p}, **model_batch))(params)
  shapes = shapes_in_jaxpr(jaxpr.jaxpr)
  c, b, v, s = cfg.llm, 2, 32, 32 + 13
  g = c.num_heads // c.num_kv_heads
  visual_or_all_queries = {(b, v, c.num_heads, c.head_dim), (b, s, c.num_heads, c.head_dim)}
  square_scores = {(b, c.num_kv_heads, g, s, s)}
  visual_ffn_act = {(b, v, c.mlp_dim)}
  composite = attention == "composite"
  assert bool(shapes & visual_or_all_queries) != composite
  assert bool(shapes & square_scores) != composite
  assert bool(shapes & visual_ffn_act) == cfg.mode.runs_visual_ffn


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_llava_7b_parameter_count_without_allocating():
  cfg = eem.ModelConfig.preset("llava-1.5-7b")
  assert cfg.tokens_per_image == 576
  shapes = abstract_params(cfg)
  assert count(shapes["llm"]) == 6_738_415_616  # Vicuna-7B
  d, f = 1024, 4096  # CLIP ViT-L/14-336: 24 layers, 577 positions, as HF's CLIPVisionModel counts it
  per_layer = 4 * (d * d + d) + 2 * 2 * d + (d * f + f) + (f * d + d)
  assert count(shapes["vision"]) == 24 * per_layer + 14 * 14 * 3 * d + d + 577 * d + 2 * 2 * d == 303_507_456
  assert count(shapes["projector"]) == 1024 * 4096 + 4096 + 4096 * 4096 + 4096  # 20.98M
  assert round(count(shapes) / 1e9, 2) == 7.06


def test_qwen2_siglip_parameter_count_without_allocating():
  cfg = eem.ModelConfig.preset("qwen2-7b-siglip")
  assert cfg.tokens_per_image == 729  # 384 px / 14 px patches -> 27 x 27 (HF's conv drops 6 px)
  shapes = abstract_params(cfg)
  assert count(shapes["llm"]) == 7_615_616_512  # Qwen2-7B (GQA 28/4, qkv bias, untied)
  d, f = 1152, 4304  # SigLIP-so400m/14-384 with its last layer removed (26 layers), no pooling head
  per_layer = 4 * (d * d + d) + 2 * 2 * d + (d * f + f) + (f * d + d)
  assert count(shapes["vision"]) == 26 * per_layer + 14 * 14 * 3 * d + d + 729 * d + 2 * d


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("attention", ["self", "composite"])
@pytest.mark.slow
def test_jit_and_grad_are_finite(dtype, attention):
  cfg = eem.ModelConfig.preset("tiny", attention=attention, dtype=dtype, remat="full")
  batch = make_batch(cfg, MIXED_PLANS)
  batch["labels"] = np.where(batch["text_valid"], batch["input_ids"], -100).astype(np.int32)
  params = init_params(cfg)
  model = eem.EEMLLM(cfg)

  def loss_fn(p):
    logits = model.apply({"params": p}, **batch)
    mask = batch["labels"] >= 0
    lp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(lp, jnp.maximum(batch["labels"], 0)[..., None], -1)[..., 0]
    return jnp.sum(nll * mask) / mask.sum()

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  assert np.isfinite(loss)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  # every parameter that the forward uses receives gradient (post_layernorm is unused by design)
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  zero = [jax.tree_util.keystr(k) for k, g in flat if not bool(jnp.any(g != 0))]
  assert zero == ["['vision']['post_layernorm']['bias']", "['vision']['post_layernorm']['scale']"], zero


@pytest.mark.parametrize("mode", ["self", "composite"])
def test_a_batch_without_image_slots_equals_one_with_an_invalid_slot(mode):
  """Text-only batches (data.max_images = 0) need no image slot: the logits are those of the same
  rows with one slot whose image is invalid. Cross mode refuses them by name."""
  cfg = eem.ModelConfig.preset("tiny").replace(**({"attention": "self"} if mode == "self" else
                                                  {"attention": "composite", "visual_ffn": False}))
  one = make_batch(cfg, [[5], [7]], max_images=1)
  none = dict(one, pixel_values=one["pixel_values"][:, :0], image_valid=one["image_valid"][:, :0],
              visual_positions=one["visual_positions"][:, :0])
  params = init_params(cfg)
  want, got = np.asarray(forward(cfg, params, one)), np.asarray(forward(cfg, params, none))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.max(np.abs(want)))  # summation order only
  cross = eem.ModelConfig.preset("tiny").replace(attention="cross", cross_every=1)
  with pytest.raises(eem.batch.BatchError, match="cross mode's blocks need at least one slot"):
    eem.batch.validate(none, cross)
