"""VisionZip at the tower's output (models/reduction.py): keeping every token is the plain model,
the merge is a numpy reference's, and generation (cached, prefix reuse) equals full forwards,
alone and with composite attention and FastV."""

import jax
import numpy as np
import pytest

import ee_mllm_jax as eem
from batches import MIXED_PLANS, make_batch
from models import assert_cached_generation_equals_full_forwards, forward, init_params
from ee_mllm_jax.generate import prefill_prefix, split_at_last_image
from ee_mllm_jax.models.reduction import visionzip_merge


def llava(tower="clip"):
  base = eem.ModelConfig.preset("tiny", attention="self")
  return base.replace(vision=base.vision.replace(kind=tower))


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_keeping_every_token_is_the_plain_model(tower):
  plain = llava(tower)
  cfg = plain.run_as(visionzip_dominant=plain.tokens_per_image)
  assert cfg.tokens_per_image == plain.tokens_per_image
  batch, params = make_batch(cfg, MIXED_PLANS), init_params(plain)
  np.testing.assert_array_equal(np.asarray(forward(cfg, params, batch)), np.asarray(forward(plain, params, batch)))
  # guard: fewer tokens is another model
  small = plain.run_as(visionzip_dominant=6, visionzip_contextual=2)
  assert small.tokens_per_image == 8
  assert forward(small, params, make_batch(small, MIXED_PLANS)).shape == batch["input_ids"].shape + (256,)


def numpy_visionzip(feats, scores, keys, dominant, contextual):
  """VisionZip per image, loop by loop: the top `dominant` by score (ascending index), then of the
  rest (ascending index) every ((P - d) // c)-th is a centre; every other one joins the centre of
  highest key cosine; a contextual token is the mean of its centre and its members."""
  out = []
  for f, s, k in zip(np.asarray(feats, np.float64), np.asarray(scores, np.float64), np.asarray(keys, np.float64)):
    top = np.sort(np.argsort(-s, kind="stable")[:dominant])
    rest = [j for j in range(len(s)) if j not in set(top)]
    step = len(rest) // contextual
    centres = [rest[i * step] for i in range(contextual)]
    others = [j for j in rest if j not in centres]
    unit = k / np.linalg.norm(k, axis=-1, keepdims=True)
    groups = {c: [f[c]] for c in centres}
    for j in others:
      groups[centres[int(np.argmax([unit[j] @ unit[c] for c in centres]))]].append(f[j])
    out.append(np.concatenate([f[top], np.stack([np.mean(groups[c], axis=0) for c in centres])]))
  return np.stack(out)


@pytest.mark.parametrize("dominant,contextual", [(5, 3), (2, 1), (9, 7)])
def test_merge_matches_numpy_reference(dominant, contextual):
  kf, ks, kk = jax.random.split(jax.random.key(0), 3)
  feats, scores, keys = (jax.random.normal(kf, (3, 16, 8)), jax.random.normal(ks, (3, 16)),
                         jax.random.normal(kk, (3, 16, 4)))
  got = visionzip_merge(feats, scores, keys, dominant, contextual)
  np.testing.assert_allclose(np.asarray(got), numpy_visionzip(feats, scores, keys, dominant, contextual),
                             rtol=1e-5, atol=1e-6)


SETTINGS = {"visionzip": dict(visionzip_dominant=6, visionzip_contextual=2),
            "composite+visionzip+fastv": dict(attention="composite", visionzip_dominant=6, visionzip_contextual=2,
                                              fastv_layer=1, fastv_ratio=0.5)}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_cached_greedy_generation_equals_repeated_full_forwards(setting):
  cfg = llava().run_as(**SETTINGS[setting])
  assert_cached_generation_equals_full_forwards(cfg, make_batch(cfg, MIXED_PLANS))


def test_prefix_reuse_equals_recomputing():
  cfg = llava().run_as(attention="composite", **SETTINGS["visionzip"])
  batch, params = make_batch(cfg, MIXED_PLANS), init_params(cfg)
  full = eem.generate(params, cfg, batch, max_new_tokens=4)
  prefix, rest = split_at_last_image(batch)
  reused = eem.generate(params, cfg, rest, cache=prefill_prefix(params, cfg, prefix), max_new_tokens=4)
  np.testing.assert_array_equal(np.asarray(reused.tokens), np.asarray(full.tokens))
