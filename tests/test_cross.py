"""Cross mode (Flamingo): zero gates are the text-only LLM, media masking by position, equality with
the naive float64 reference, cached generation and prefix reuse, parameter counts, partial init."""

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

import ee_mllm_jax as eem
from batches import MIXED_PLANS, make_batch
from models import embed_image, forward, init_params
from reference import naive_cross_logits
from test_generate import greedy_by_full_forward
from ee_mllm_jax import batch as batch_lib
from ee_mllm_jax.generate import prefill_prefix, split_at_last_image
from ee_mllm_jax.params import abstract_params, flatten, overlay

# Two blocks (one before each of the tiny preset's two layers) so that the group scan runs twice.
CFG = eem.ModelConfig.preset("tiny", attention="cross", cross_every=1)
RESAMPLED = CFG.replace(resampler_latents=3, resampler_depth=2)
# Four layers in two groups of two: blocks before layers 1 and 3 (OpenFlamingo's placement), so the
# first block reads layer 0's output, and every group runs a layer, the block, a layer.
GROUPED = CFG.replace(llm=CFG.llm.replace(depth=4), cross_every=2)
# system prompt; two images with text between them ("previous" and "all" differ); text only; short.
# The other modes' tests use the same batch shapes, so the suite compiles their forward once.
PLANS = MIXED_PLANS
VARIANTS = [CFG, CFG.replace(cross_media="all"), RESAMPLED, GROUPED]
VARIANT_IDS = ["previous", "all", "resampler", "every-2"]


@functools.cache
def _init(cfg):
  return jax.jit(lambda key: nn.meta.unbox(eem.EEMLLM(cfg).init(key, **batch_lib.example(cfg))["params"]))


def cross_params(cfg, *, trained=True, seed=0):
  """A cross model's parameters; `trained`: non-zero gates and random norm scales (a misplaced
  norm or gate cannot pass), as after training. cross_media does not change the parameters."""
  params = _init(cfg.replace(cross_media="previous"))(jax.random.key(seed))
  if not trained:
    return params

  def perturb(path, x):
    name, key = jax.tree_util.keystr(path), jax.random.key(len(jax.tree_util.keystr(path)))
    if "gate" in name:
      return 0.5 + 0.5 * jax.random.uniform(key, x.shape)
    return x * (1 + 0.3 * jax.random.normal(key, x.shape)) if "scale" in name else x
  return jax.tree_util.tree_map_with_path(perturb, params)


def test_untrained_cross_model_is_the_text_only_llm():
  """Gates start at 0: the logits equal the same LLM weights run with no image at all, and do
  not depend on the images."""
  batch = make_batch(CFG, PLANS)
  params = cross_params(CFG, trained=False)
  llm_only = {k: v for k, v in params.items() if k != "llm"} | {"llm": {k: v for k, v in params["llm"].items()
                                                                         if k != "cross"}}
  self_cfg = eem.ModelConfig.preset("tiny", attention="self", visual_ffn=True)
  no_image = dict(batch, image_valid=np.zeros_like(batch["image_valid"]))
  got = np.asarray(forward(CFG, params, batch))
  text_only = np.asarray(forward(self_cfg, llm_only, no_image))
  valid = batch["text_valid"]
  np.testing.assert_allclose(got[valid], text_only[valid], rtol=0, atol=2e-6)
  np.testing.assert_array_equal(got, np.asarray(forward(CFG, params, no_image)))  # the images change nothing
  trained = np.asarray(forward(CFG, cross_params(CFG), batch))  # guard: non-zero gates do change it
  assert np.max(np.abs(trained - text_only)[valid]) > 1e-3


@pytest.mark.parametrize("cfg", VARIANTS, ids=VARIANT_IDS)
def test_text_before_an_image_is_blind_to_it_and_text_after_sees_it(cfg):
  batch = make_batch(cfg, PLANS)
  params = cross_params(cfg)
  other = dict(batch, pixel_values=batch["pixel_values"].copy())
  other["pixel_values"][0, 0] += 1.0  # row 0: [3 text, image, 5 text]
  other["pixel_values"][1, 1] += 1.0  # row 1: [2 text, image, 3 text, *image*, 4 text]
  a, b = np.asarray(forward(cfg, params, batch)), np.asarray(forward(cfg, params, other))
  # zero cross-attention output before the image (not a mean over padding), nothing else changes
  np.testing.assert_array_equal(a[0, :3], b[0, :3])
  np.testing.assert_array_equal(a[1, :5], b[1, :5])
  np.testing.assert_array_equal(a[2:], b[2:])
  assert np.min(np.max(np.abs(a[0, 3:8] - b[0, 3:8]), axis=-1)) > 1e-4  # every later token sees it
  assert np.min(np.max(np.abs(a[1, 5:9] - b[1, 5:9]), axis=-1)) > 1e-4


@pytest.mark.parametrize("cfg", VARIANTS, ids=VARIANT_IDS)
def test_cross_mode_equals_naive_reference_with_explicit_media_mask(cfg):
  batch = make_batch(cfg, PLANS)
  params = cross_params(cfg)
  got = np.asarray(forward(cfg, params, batch), np.float64)
  x_v = embed_image(cfg, params, batch["pixel_values"])
  want = naive_cross_logits(params, cfg, x_v, batch["input_ids"], batch["visual_positions"],
                            batch["text_positions"], batch["image_valid"], batch["text_valid"])
  valid = batch["text_valid"]
  err = np.max(np.abs(got - want)[valid]) / np.max(np.abs(want[valid]))
  assert err < 1e-5, f"max relative error {err:.2e}"


def test_blocks_sit_before_the_last_layer_of_each_group_as_in_openflamingo():
  """OpenFlamingo runs a block before layer l when (l + 1) % k == 0 (layers 1 and 3 of 4 at k = 2),
  never on the raw embeddings; the placement before layers 0, 2 (blocks first) is another function,
  which the model does not compute."""
  cfg = GROUPED
  batch = make_batch(cfg, PLANS)
  params = cross_params(cfg)
  got = np.asarray(forward(cfg, params, batch), np.float64)
  x_v = embed_image(cfg, params, batch["pixel_values"])
  args = (params, cfg, x_v, batch["input_ids"], batch["visual_positions"], batch["text_positions"],
          batch["image_valid"], batch["text_valid"])
  want, blocks_first = naive_cross_logits(*args), naive_cross_logits(*args, blocks_first=True)
  valid = batch["text_valid"]
  rel = lambda a, b: np.max(np.abs(a - b)[valid]) / np.max(np.abs(b[valid]))
  assert rel(got, want) < 1e-5
  assert rel(got, blocks_first) > 1e-2, "the two placements should be different functions"


def test_previous_and_all_differ_only_after_a_second_image():
  """Guards the reference test: the two masks are different functions where they should be."""
  batch = make_batch(CFG, PLANS)
  params = cross_params(CFG)
  prev, every = (np.asarray(forward(CFG.replace(cross_media=m), params, batch)) for m in ("previous", "all"))
  second = batch["text_positions"][1] > batch["visual_positions"][1, CFG.tokens_per_image]  # row 1, after image 2
  np.testing.assert_array_equal(np.delete(prev, 1, 0), np.delete(every, 1, 0))  # rows with <= 1 image
  np.testing.assert_array_equal(prev[1, :5], every[1, :5])
  assert np.min(np.max(np.abs(prev[1] - every[1])[second & batch["text_valid"][1]], -1)) > 1e-4


@pytest.mark.parametrize("cfg", [CFG, GROUPED], ids=["every-1", "every-2"])
def test_cached_greedy_equals_repeated_full_forward_and_prefix_reuse(cfg):
  steps = 6
  batch = make_batch(cfg, PLANS)
  params = cross_params(cfg)
  out = eem.generate(params, cfg, batch, max_new_tokens=steps)
  want_tokens, want_logprobs = greedy_by_full_forward(cfg, params, batch, steps)
  np.testing.assert_array_equal(np.asarray(out.tokens), want_tokens)
  np.testing.assert_allclose(np.asarray(out.logprobs), want_logprobs, rtol=0, atol=1e-5)
  assert len(np.unique(want_tokens)) > steps  # guard: the rows do not all repeat one token
  # the image prefix (system text, images, their cross keys/values) computed once, reused
  prefix, rest = split_at_last_image(batch)
  cache = prefill_prefix(params, cfg, prefix)
  assert cache.k.shape[2] == prefix["input_ids"].shape[1]  # self-attention slots: text only
  reused = eem.generate(params, cfg, rest, cache=cache, max_new_tokens=steps)
  np.testing.assert_array_equal(np.asarray(reused.tokens), want_tokens)
  np.testing.assert_allclose(np.asarray(reused.logprobs), want_logprobs, rtol=0, atol=1e-5)
  # two questions about each image: one prefix cache per image, tiled (the same shapes as above)
  rows = [0, 0, 1, 1]
  tiled = eem.generate(params, cfg, {k: v[rows] for k, v in rest.items()},
                       cache=prefill_prefix(params, cfg, {k: v[:2] for k, v in prefix.items()}).repeat(2),
                       max_new_tokens=steps)
  np.testing.assert_array_equal(np.asarray(tiled.tokens), want_tokens[rows])
  # uneven sharing (eval: questions per image vary): every row's media moves with its cache row
  rows = [2, 0, 0, 2]
  taken = eem.generate(params, cfg, {k: v[rows] for k, v in rest.items()}, cache=cache.take_rows(rows),
                       max_new_tokens=steps)
  np.testing.assert_array_equal(np.asarray(taken.tokens), want_tokens[rows])


def test_config_rejects_a_depth_that_does_not_divide():
  with pytest.raises(ValueError, match="llm.depth 2 is not a multiple of cross_every 4"):
    eem.ModelConfig.preset("tiny", attention="cross")
  with pytest.raises(ValueError, match="cross_media"):
    CFG.replace(cross_media="next")


def test_a_self_mode_checkpoint_initialises_a_cross_model_partially():
  """The Flamingo start: a pretrained (self-mode) model's parameters overlay a fresh cross model;
  the report names the new groups, everything else is loaded unchanged."""
  pretrained = init_params(eem.ModelConfig.preset("tiny", attention="self", visual_ffn=True), seed=3)
  fresh = cross_params(RESAMPLED, trained=False)
  params, report = overlay(fresh, pretrained)
  assert {p.split("/")[0] + ("/cross" if p.startswith("llm/cross/") else "") for p in report.initialised} == \
      {"llm/cross", "resampler"}
  assert "llm/cross" in str(report) and not report.unused
  for path, x in flatten(pretrained).items():
    np.testing.assert_array_equal(np.asarray(flatten(params)[path]), np.asarray(x), err_msg=path)


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_7b_cross_every_4_new_parameter_count_without_allocating():
  cfg = eem.ModelConfig.preset("llava-1.5-7b", attention="cross", cross_every=4, resampler_latents=64,
                               resampler_depth=6)
  shapes = abstract_params(cfg)
  llava = abstract_params(cfg.replace(attention="self"))
  d, heads = 4096, 32 * 128  # width, N * H
  block = 2 * 2 * d + 4 * d * heads + 2 * d * 4 * d + 2  # norm, q/k/v/o, FFN (its norm + up/down), two gates
  resampler_layer = 3 * 2 * d + 4 * d * heads + 2 * d * 4 * d  # media/latent/FFN norms, q/k/v/o, FFN
  assert count(shapes["llm"]["cross"]) == 8 * block == 1_610_743_824  # 32 layers / 4 = 8 blocks
  assert count(shapes["resampler"]) == 64 * d + 6 * resampler_layer + 2 * d == 1_208_377_344
  new = count(shapes) - count(llava)
  assert new == 8 * block + count(shapes["resampler"])
  assert flatten(shapes).keys() >= flatten(llava).keys()  # the LLaVA tree is unchanged inside it
  print(f"7B cross every 4: {new / 1e9:.3f}B new parameters ({8 * block / 1e9:.3f}B blocks)")

