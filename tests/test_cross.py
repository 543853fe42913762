"""Cross mode (Flamingo): zero gates are the text-only LLM, media masking by position, equality with
the naive float64 reference, cached generation and prefix reuse, parameter counts, partial init."""

import dataclasses
import functools
import os
import re
import sys

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
from conftest import ROOT

sys.path.insert(0, ROOT)

# Two blocks (one before each of the tiny preset's two layers) so that the group scan runs twice.
CFG = eem.ModelConfig.preset("tiny", attention="cross", cross_every=1)
RESAMPLED = CFG.replace(resampler_latents=3, resampler_depth=2)
# Four layers in two groups of two: blocks before layers 1 and 3 (OpenFlamingo's placement), so the
# first block reads layer 0's output, and every group runs a layer, the block, a layer.
GROUPED = CFG.replace(llm=CFG.llm.replace(depth=4), cross_every=2)
# system prompt; two images with text between them ("previous" and "all" differ); text only; short.
# The other modes' tests use the same batch shapes, so the suite compiles their forward once.
PLANS = MIXED_PLANS
# OpenFlamingo's shape, scaled down: cross heads of their own (2 x 8, the LLM's are 4 x 16), the
# resampler and the blocks' keys/values at the tower's width (32; the LLM's is 64), no projector.
OPENFLAMINGO_SHAPE = RESAMPLED.replace(cross_heads=2, cross_head_dim=8, cross_media_width="vision")
VARIANTS = [CFG, CFG.replace(cross_media="all"), RESAMPLED, GROUPED, RESAMPLED.replace(cross_ffn_activation="gelu_tanh"),
            OPENFLAMINGO_SHAPE]
VARIANT_IDS = ["previous", "all", "resampler", "every-2", "gelu_tanh", "openflamingo-shape"]


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


@pytest.mark.slow
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
@pytest.mark.slow
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


@pytest.mark.parametrize("cfg", [pytest.param(c, id=i, marks=() if i == "previous" else pytest.mark.slow)
                                 for c, i in zip(VARIANTS, VARIANT_IDS)])  # the developer tier runs one
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
@pytest.mark.slow
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


def test_ffn_activation_defaults_to_openflamingos_exact_gelu_and_changes_no_parameter():
  """OpenFlamingo's FeedForward (blocks and perceiver) uses nn.GELU(), the erf form: the default.
  The tanh form is an option of the same parameters and a slightly different function (both
  forms are checked against the float64 reference above)."""
  assert eem.mode.Cross().ffn_activation == "gelu" and RESAMPLED.mode.ffn_activation == "gelu"
  tanh = RESAMPLED.replace(cross_ffn_activation="gelu_tanh")
  assert tanh.mode.params_key() == RESAMPLED.mode.params_key()
  assert jax.tree.map(lambda s: s.shape, abstract_params(tanh)) == jax.tree.map(lambda s: s.shape,
                                                                                abstract_params(RESAMPLED))
  batch = make_batch(RESAMPLED, PLANS)
  params = cross_params(RESAMPLED)
  erf, approx = (np.asarray(forward(c, params, batch), np.float64) for c in (RESAMPLED, tanh))
  valid = batch["text_valid"]
  assert 1e-6 < np.max(np.abs(erf - approx)[valid]) / np.max(np.abs(erf[valid])) < 1e-2
  with pytest.raises(ValueError, match="cross_ffn_activation"):
    CFG.replace(cross_ffn_activation="relu")


def test_new_cross_fields_are_validated():
  for flags, match in [(dict(cross_heads=-1), "cross_heads"), (dict(cross_head_dim=1.5), "cross_head_dim"),
                       (dict(cross_media_width="projector"), "cross_media_width")]:
    with pytest.raises(ValueError, match=match):
      CFG.replace(**flags)


@pytest.mark.slow
def test_media_at_the_vision_width_has_no_projector_and_every_parameter_is_used():
  """OpenFlamingo's shape: the resampler and the blocks' keys/values read the tower's features
  (width 32 here, the LLM's 64), with cross heads of their own; there is no projector, and
  every parameter outside the tower gets a gradient (nothing in the tree is unused)."""
  cfg = OPENFLAMINGO_SHAPE
  params = cross_params(cfg)
  flat = flatten(params)
  assert not any(k.startswith("projector/") for k in flat)
  assert flat["llm/cross/k_proj/kernel"].shape == (2, 32, 2, 8)  # (blocks, tower width, heads, head dim)
  assert flat["llm/cross/q_proj/kernel"].shape == (2, 64, 2, 8)
  assert flat["resampler/latents"].shape == (3, 32) and flat["resampler/layers/q_proj/kernel"].shape == (2, 32, 2, 8)
  batch = batch_lib.model_inputs(make_batch(cfg, PLANS))
  loss = lambda p: jax.numpy.sum(eem.EEMLLM(cfg).apply({"params": p}, **batch) * batch["text_valid"][..., None])
  grads = flatten(jax.jit(jax.grad(loss))(params))
  unused = [k for k, g in grads.items() if not k.startswith("vision/") and not np.any(np.asarray(g))]
  assert not unused, unused
  assert np.any(np.asarray(grads["vision/patch_embedding"]))  # the media reach the tower without a projector
  assert embed_image(cfg, params, batch["pixel_values"]).shape[-1] == cfg.vision.width


def test_cross_modules_equal_openflamingos_on_mapped_weights():
  """OpenFlamingo 2.0.1's GatedCrossAttentionBlock and PerceiverResampler, run in float64 by
  tests/tools/openflamingo_cross.py on weights in our layout (2 heads of 8 at text width 24, media
  width 16, exact GELU, two images, "previous" masking), outputs pinned in tests/data: ours
  computes the same on the same weights."""
  from ee_mllm_jax.config import LLMConfig  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax.models.cross import GatedCrossBlock, PerceiverResampler  # pylint: disable=g-import-not-at-top
  ref = np.load(os.path.join(ROOT, "tests", "data", "openflamingo_cross.npz"))
  tree = lambda prefix: eem.params.unflatten({k[len(prefix):]: np.asarray(ref[k], np.float32) for k in ref.files
                                              if k.startswith(prefix)})
  llm = LLMConfig(vocab_size=8, width=24, depth=1, num_heads=3, num_kv_heads=1, head_dim=8, mlp_dim=8)
  cross = eem.mode.Cross(every=1, resampler_latents=3, resampler_depth=2, heads=2, head_dim=8, media_width="vision")
  f32 = lambda name: np.asarray(ref[name], np.float32)
  latents = PerceiverResampler(llm, cross).apply({"params": tree("resampler/")}, f32("features"))
  rel = lambda a, b: np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b))
  assert rel(latents, ref["latents"]) < 1e-5
  # OpenFlamingo: <image> at text 0 and 3 (tokens 0-2 see image 1, 3-6 image 2); ours: by position
  q_pos = 2 * np.arange(7, dtype=np.int32)[None]
  media_pos, media_valid = np.array([[-1, 5]], np.int32), np.ones((1, 2), bool)
  run = lambda m, x, media: m.update(x, q_pos, m.keys_values(media), media_pos, media_valid)
  out = GatedCrossBlock(llm, cross, 16).apply({"params": tree("block/")}, f32("text"), f32("latents"), method=run)
  assert rel(out, ref["out"]) < 1e-5
  assert rel(out, ref["text"]) > 0.1  # guard: the gates are open, the block does change the text
  tanh = dataclasses.replace(cross, ffn_activation="gelu_tanh")  # guard: the tanh form is measurably another function
  assert rel(GatedCrossBlock(llm, tanh, 16).apply({"params": tree("block/")}, f32("text"), f32("latents"),
                                                  method=run), ref["out"]) > 1e-5


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_7b_openflamingo_shaped_cross_modules_parameter_count_without_allocating():
  """The Flamingo recipe's default (configs/flamingo_7b.py): 8 heads of 64, resampler and block
  keys/values at CLIP-L's width 1024, no projector: 1.18B trainable parameters, against 2.84B with
  the LLM's heads at the LLM's width (and a projector)."""
  from configs import flamingo_7b  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax import experiment  # pylint: disable=g-import-not-at-top
  cfg = experiment.model_config(flamingo_7b.get_config())
  assert (cfg.mode.heads, cfg.mode.head_dim, cfg.mode.media_width) == (8, 64, "vision")
  shapes = abstract_params(cfg)
  d, e, inner = 4096, 1024, 8 * 64  # LLM width, CLIP-L width, N * H
  block = 2 * 2 * d + d * inner + 2 * e * inner + inner * d + 2 * d * 4 * d + 2  # norm, q, k/v, o, FFN, gates
  resampler_layer = 3 * 2 * e + 2 * e * inner + 2 * e * inner + 2 * e * 4 * e  # norms, q/o, k/v, FFN
  assert count(shapes["llm"]["cross"]) == 8 * block == 1_115_815_952
  assert count(shapes["resampler"]) == 64 * e + 6 * resampler_layer + 2 * e == 63_019_008
  assert "projector" not in shapes
  trainable = count({k: v for k, v in flatten(shapes).items() if re.match(flamingo_7b.TRAINABLE, k)})
  assert trainable == 1_178_834_960
  llm_shaped = cfg.replace(cross_heads=0, cross_head_dim=0, cross_media_width="llm")
  assert count({k: v for k, v in flatten(abstract_params(llm_shaped)).items()
                if re.match(flamingo_7b.TRAINABLE, k)}) == 2_840_100_880  # + the 21M projector
  print(f"7B Flamingo trainable: {trainable / 1e9:.3f}B (OpenFlamingo shape), 2.840B (LLM shape)")


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

