"""Cached generation: equals repeated full forward passes, batching and prefix reuse change no
token, stop ids, reproducible sampling, and composite mode computes no visual queries."""

import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ee_mllm_jax as eem
from batches import MIXED_PLANS, make_batch
from jaxpr_shapes import shapes_in_jaxpr
from models import greedy_by_full_forward, init_params
from ee_mllm_jax.generate import prefill_prefix, sample_token, split_at_last_image

generate_lib = sys.modules["ee_mllm_jax.generate"]  # the package's `generate` attribute is the function

# (attention, visual_ffn): LLaVA, EE-MLLM, EE-MLLM-F; all run the same LLaVA-style parameters
MODES = {"self": ("self", True), "composite": ("composite", False), "ee-mllm-f": ("composite", True)}
STEPS = 8


def llava_params():
  """One parameter set (LLaVA-style, i.e. trained in self mode) that every mode runs."""
  return init_params(eem.ModelConfig.preset("tiny", attention="self", visual_ffn=True))


def setup(mode, plans=MIXED_PLANS):
  attention, visual_ffn = MODES[mode]
  cfg = eem.ModelConfig.preset("tiny", attention=attention, visual_ffn=visual_ffn)
  return cfg, make_batch(cfg, plans), llava_params()


@pytest.mark.parametrize("mode", list(MODES))
def test_greedy_with_cache_equals_argmax_of_repeated_full_forward(mode):
  cfg, batch, params = setup(mode)
  out = eem.generate(params, cfg, batch, max_new_tokens=STEPS)
  want_tokens, want_logprobs = greedy_by_full_forward(cfg, params, batch, STEPS)
  np.testing.assert_array_equal(np.asarray(out.tokens), want_tokens)
  np.testing.assert_allclose(np.asarray(out.logprobs), want_logprobs, rtol=0, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(out.lengths), STEPS)
  assert len(np.unique(want_tokens)) > STEPS  # guard: the rows do not all repeat one token


@pytest.mark.slow
def test_padded_batch_equals_each_prompt_alone():
  cfg, batch, params = setup("self")  # visual queries too: the mode with the most to leak
  together = eem.generate(params, cfg, batch, max_new_tokens=4)
  for row in (1, 3):  # two images, the longest row; one image, the shortest, padded everywhere
    n_text, n_img = int(batch["text_valid"][row].sum()), max(1, int(batch["image_valid"][row].sum()))
    p = cfg.tokens_per_image
    alone = dict(pixel_values=batch["pixel_values"][row:row + 1, :n_img],
                 image_valid=batch["image_valid"][row:row + 1, :n_img],
                 visual_positions=batch["visual_positions"][row:row + 1, :n_img * p],
                 **{k: batch[k][row:row + 1, :n_text] for k in ("input_ids", "text_positions", "text_valid")})
    out = eem.generate(params, cfg, alone, max_new_tokens=4)
    np.testing.assert_array_equal(np.asarray(out.tokens[0]), np.asarray(together.tokens[row]))
    np.testing.assert_allclose(np.asarray(out.logprobs[0]), np.asarray(together.logprobs[row]), atol=1e-5)


@pytest.mark.parametrize("mode", ["self", "composite"])
@pytest.mark.slow
def test_reusing_an_image_prefix_cache_equals_recomputing(mode):
  cfg, batch, params = setup(mode)
  full = eem.generate(params, cfg, batch, max_new_tokens=STEPS)
  prefix, rest = split_at_last_image(batch)
  reused = eem.generate(params, cfg, rest, cache=prefill_prefix(params, cfg, prefix), max_new_tokens=STEPS)
  np.testing.assert_array_equal(np.asarray(reused.tokens), np.asarray(full.tokens))
  np.testing.assert_allclose(np.asarray(reused.logprobs), np.asarray(full.logprobs), atol=1e-5)

  # Two questions about one image (same system prompt): one prefix cache, tiled.
  two = make_batch(cfg, [[3, "img", 5], [3, "img", 2]], seed=1)
  two["pixel_values"][1], two["input_ids"][1, :3] = two["pixel_values"][0], two["input_ids"][0, :3]
  prefix, rest = split_at_last_image(two)
  cache = prefill_prefix(params, cfg, {k: v[:1] for k, v in prefix.items()}).repeat(2)
  shared = eem.generate(params, cfg, rest, cache=cache, max_new_tokens=STEPS)
  full = eem.generate(params, cfg, two, max_new_tokens=STEPS)
  np.testing.assert_array_equal(np.asarray(shared.tokens), np.asarray(full.tokens))
  np.testing.assert_allclose(np.asarray(shared.logprobs), np.asarray(full.logprobs), atol=1e-5)


def test_stop_id_stops_its_row_while_others_continue():
  cfg, batch, params = setup("composite")
  free = np.asarray(eem.generate(params, cfg, batch, max_new_tokens=STEPS).tokens)

  def expected_lengths(stop):
    hits = free == stop
    return np.where(hits.any(1), hits.argmax(1) + 1, STEPS)

  # a token row 0 emits mid-way, before some other row would emit it (if ever)
  stop = next(t for t in free[0, 1:] if expected_lengths(t)[0] < expected_lengths(t).max())
  lengths = expected_lengths(stop)
  out = eem.generate(params, cfg, batch, max_new_tokens=STEPS, stop_ids=(stop, 9999), pad_id=-1)
  np.testing.assert_array_equal(np.asarray(out.lengths), lengths)
  for row, n in enumerate(lengths):
    np.testing.assert_array_equal(np.asarray(out.tokens[row, :n]), free[row, :n])
    assert np.all(np.asarray(out.tokens[row, n:]) == -1)
    assert np.all(np.asarray(out.logprobs[row, n:]) == 0)


def test_sampling_is_reproducible_for_a_seed():
  cfg, batch, params = setup("composite")
  sample = lambda seed, **kw: np.asarray(eem.generate(params, cfg, batch, max_new_tokens=STEPS,
                                                      rng=jax.random.key(seed), temperature=1.0, **kw).tokens)
  a, b, c = sample(0, top_p=0.9), sample(0, top_p=0.9), sample(1, top_p=0.9)
  np.testing.assert_array_equal(a, b)
  assert np.mean(a != c) > 0.5
  greedy = np.asarray(eem.generate(params, cfg, batch, max_new_tokens=STEPS).tokens)
  assert np.mean(a != greedy) > 0.5
  np.testing.assert_array_equal(sample(3, top_p=1e-6), greedy)  # top-p keeps only the top token


def test_new_temperature_or_top_p_compiles_nothing():
  """temperature and top_p are traced: only greedy vs sampling and top_p < 1 vs 1 choose the
  decode program, so a sweep over their values compiles it once."""
  cfg, batch, params = setup("composite")
  run = lambda t, p: eem.generate(params, cfg, batch, max_new_tokens=2, rng=jax.random.key(0), temperature=t,
                                  top_p=p).tokens.block_until_ready()
  run(0.7, 0.9)
  compiled = generate_lib._decode._cache_size()
  run(1.3, 0.5)
  run(0.2, 0.95)
  assert generate_lib._decode._cache_size() == compiled


def test_top_p_keeps_the_smallest_set_with_enough_mass():
  probs = np.array([0.5, 0.3, 0.15, 0.05])
  logits = jnp.log(jnp.asarray(np.tile(probs, (20000, 1)), jnp.float32))
  tokens = np.asarray(sample_token(logits, jax.random.key(0), temperature=1.0, top_p=0.7))
  freq = np.bincount(tokens, minlength=4) / tokens.size
  np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.015)  # renormalised over {0, 1}
  hot = np.asarray(sample_token(logits, jax.random.key(0), temperature=0.25, top_p=1.0))
  np.testing.assert_allclose(np.bincount(hot, minlength=4) / hot.size, probs ** 4 / np.sum(probs ** 4), atol=0.015)


@pytest.mark.parametrize("mode", ["self", "composite", "ee-mllm-f"])
def test_composite_prefill_and_decode_compute_no_visual_queries_or_square_scores(mode):
  cfg, batch, params = setup(mode, plans=[[3, "img", 5, "img", 4]] * 2)  # V = 32, T = 13, S = 45
  new = 3
  jaxpr = jax.make_jaxpr(lambda p: eem.generate(p, cfg, batch, max_new_tokens=new))(params)
  shapes = shapes_in_jaxpr(jaxpr.jaxpr)
  c, b, v, t, s = cfg.llm, 2, 32, 13, 45
  g = c.num_heads // c.num_kv_heads
  # guards that the walk sees inside the decode loop and the prefill
  assert {(b, 1, c.num_heads, c.head_dim), (b, c.num_kv_heads, g, 1, s + new - 1)} <= shapes  # decode step
  composite = cfg.attention == "composite"
  if composite:
    assert {(b, t, c.num_heads, c.head_dim), (b, c.num_kv_heads, g, t, s)} <= shapes  # text queries only
  visual_or_all_queries = {(b, v, c.num_heads, c.head_dim), (b, s, c.num_heads, c.head_dim)}
  # any score block (B, K, G, Q, S) with >= V queries and >= V keys
  square_scores = {x for x in shapes if len(x) == 5 and x[-2] >= v and x[-1] >= v}
  assert bool(shapes & visual_or_all_queries) != composite
  assert bool(square_scores) != composite


def _weight_slices_in_loop(hlo: str, shape) -> int:
  """Count the ops of an optimized HLO module that cut one layer's `shape` weight out of the
  stacked (L, ...) array by a dynamic slice: what a scan over the layers does every step."""
  found = re.findall(r"= \w+\[([\d,]*)\]\{[^}]*\} dynamic-slice\(", hlo)
  dims = [tuple(int(d) for d in x.split(",") if d) for x in found]
  return sum(d[next((i for i, n in enumerate(d) if n != 1), len(d)):] == tuple(shape) for d in dims)


@pytest.mark.parametrize("mode", ["self", "composite"])
def test_cpu_decode_step_copies_no_layer_weights(mode, monkeypatch):
  """On a CPU, XLA copies a dynamic slice of the stacked layer weights before each product, so a
  scanned decode step would move every weight twice per token. `_decode` splits the layers once
  before its loop instead. The check can fail: the scanned step (the GPU/TPU path) slices them."""
  cfg, batch, params = setup(mode)
  assert jax.default_backend() == "cpu"
  logits, cache = generate_lib.prefill(params, cfg, batch, cache_size=64)
  next_pos = jnp.full((logits.shape[0],), 60, jnp.int32)
  args = (params, cfg, logits, cache, next_pos, None, 4, True, False, jnp.float32(0),
          jnp.float32(1), (), 0)
  kernel = params["llm"]["layers"]["mlp"]["up_proj"]["kernel"].shape[1:]
  hlo = lambda: generate_lib._decode.lower(*args).compile().as_text()
  assert _weight_slices_in_loop(hlo(), kernel) == 0
  monkeypatch.setattr(generate_lib, "_step_model", lambda p, c: (eem.EEMLLM(c), lambda: p))  # the scanned step
  generate_lib._decode.clear_cache()
  assert _weight_slices_in_loop(hlo(), kernel) >= 1
  generate_lib._decode.clear_cache()
