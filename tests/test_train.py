"""Trainer properties on 8 simulated CPU devices: sharded = single device, accumulation =
one big batch, freezing is exact, checkpoints restore onto another mesh."""

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

import ee_mllm_jax as eem
from batches import make_batch
from tolerances import assert_grads_close, assert_params_within_update_bound
from ee_mllm_jax import loading, sharding
from ee_mllm_jax.train import checkpoint as ckpt_lib
from ee_mllm_jax.train.state import OptimConfig, create_sharded_state, make_init_fn, make_optimizer
from ee_mllm_jax.train.step import make_gradient_fn, make_train_step

CFG = eem.ModelConfig.preset("tiny")
LR = 1e-2
PLANS = [[3, "img", 5], [2, "img", 7], [9], ["img", 4], [1, "img", 6], [4, "img", 2], [6], ["img", 8]]


def _batch(seed=0):
  batch = make_batch(CFG, PLANS, max_images=1, seed=seed)
  rng = np.random.default_rng(seed + 1)
  labels = rng.integers(0, CFG.llm.vocab_size, batch["labels"].shape).astype(np.int32)
  batch["labels"] = np.where(batch["text_valid"] & (rng.random(labels.shape) < 0.7), labels, -100)
  return batch


@functools.cache  # tests that run the same step on the same mesh share one compilation
def _setup(mesh, trainable=".*", accum=1, lr=LR):
  model = eem.EEMLLM(CFG)
  tx, schedule = make_optimizer(OptimConfig(learning_rate=lr, total_steps=10, warmup_steps=1, trainable=trainable))
  init, shardings, abstract = create_sharded_state(make_init_fn(model, tx, trainable), mesh)
  step = jax.jit(make_train_step(model, tx, schedule, trainable, accum),
                 in_shardings=(shardings, sharding.batch_sharding(mesh, (len(PLANS),))),
                 out_shardings=(shardings, None), donate_argnums=0)
  return init, step, abstract


def _run(mesh, n_steps=2, keep_initial=False, **kw):
  init, step, _ = _setup(mesh, **kw)
  state, losses = init(), []
  initial = jax.device_get(state["params"]) if keep_initial else None  # before donation
  for i in range(n_steps):
    state, metrics = step(state, sharding.shard_batch(_batch(i), mesh))
    losses.append(float(metrics["loss"]))
  return (state, losses, initial) if keep_initial else (state, losses)


@pytest.fixture(scope="module")
def single_device_run():
  return _run(sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]))


@functools.cache
def _gradients(mesh, accum=1):
  """The first step's gradients on `mesh`: the same function the train step differentiates."""
  init, _, _ = _setup(mesh, accum=accum)
  grad = jax.jit(make_gradient_fn(eem.EEMLLM(CFG), ".*", accum))
  state = init()
  grads, loss_sum, tokens = grad(state["params"], sharding.shard_batch(_batch(0), mesh),
                                 jax.random.fold_in(state["rng"], 0))
  return jax.device_get(grads), float(loss_sum / tokens)


def _assert_same_training(state, losses, ref_state, ref_losses, grads, ref_grads):
  """Same loss and gradients to rounding (tolerances.py), parameters within the update bound."""
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert_grads_close(grads[0], ref_grads[0])
  np.testing.assert_allclose(grads[1], ref_grads[1], rtol=1e-5)
  schedule = make_optimizer(OptimConfig(learning_rate=LR, total_steps=10, warmup_steps=1))[1]
  assert_params_within_update_bound(state["params"], ref_state["params"], [schedule(i) for i in range(len(losses))])


@pytest.mark.slow
def test_sharded_step_equals_single_device_step(single_device_run):
  mesh = sharding.make_mesh((2, 2, 2))
  state, losses = _run(mesh)
  q = state["params"]["llm"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  single = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  _assert_same_training(state, losses, *single_device_run, _gradients(mesh), _gradients(single))


@pytest.mark.slow
def test_gradient_accumulation_equals_one_big_batch(single_device_run):
  mesh = sharding.make_mesh((2, 2, 2))
  state, losses = _run(mesh, accum=2)
  single = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  _assert_same_training(state, losses, *single_device_run, _gradients(mesh, accum=2), _gradients(single))


@pytest.mark.slow
def test_frozen_parameters_stay_bit_identical_and_have_no_optimizer_state():
  state, _, before = _run(sharding.make_mesh((2, 2, 2)), keep_initial=True, trainable="projector/")
  after = jax.device_get(state["params"])
  for group in ("vision", "llm"):
    for x, y in zip(jax.tree.leaves(before[group]), jax.tree.leaves(after[group])):
      np.testing.assert_array_equal(x, y)
  changed = [not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before["projector"]),
                                                       jax.tree.leaves(after["projector"]))]
  assert all(changed)
  n_projector = len(jax.tree.leaves(before["projector"]))
  moments = [x for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0]
  assert len(moments) == 2 * n_projector  # Adam's mu and nu, projector only


@pytest.mark.slow
def test_checkpoint_restores_onto_a_different_mesh(tmp_path):
  state, _ = _run(sharding.make_mesh((2, 2, 2)), n_steps=1)
  expected = jax.device_get(state)
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), keep=1)
  checkpointer.save(1, state, force=True)
  checkpointer.wait()
  other = sharding.make_mesh((1, 4, 2))
  _, _, abstract = _setup(other)
  restored = checkpointer.restore(1, abstract)
  checkpointer.close()
  q = restored["params"]["llm"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding.mesh.shape == other.shape
  for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(x), y)
  params = loading.load_params(str(tmp_path), abstract["params"])  # init_from path
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(expected["params"])):
    np.testing.assert_array_equal(np.asarray(x), y)


@pytest.mark.slow
def test_a_step_without_labels_or_with_non_finite_values_changes_nothing():
  """A batch whose rows were all skipped (no labelled token), or whose loss is non-finite, is
  not applied: AdamW would otherwise move the weights (momentum, decay) or write NaN into them."""
  mesh = sharding.make_mesh((2, 2, 2))
  init, step, _ = _setup(mesh)
  state = init()
  before = jax.device_get(state)
  empty = dict(_batch(0), labels=np.full_like(_batch(0)["labels"], -100))
  poisoned = _batch(1)
  poisoned["pixel_values"] = np.full_like(poisoned["pixel_values"], np.inf)
  for batch, finite in ((empty, True), (poisoned, False)):
    state, metrics = step(state, sharding.shard_batch(batch, mesh))
    assert bool(metrics["finite"]) == finite and not bool(metrics["applied"]) and bool(metrics["params_finite"])
  after = jax.device_get(state)
  assert int(after["step"]) == 2  # the steps count (the data moved on), the parameters did not
  for x, y in zip(jax.tree.leaves(after["params"]) + jax.tree.leaves(after["opt_state"]),
                  jax.tree.leaves(before["params"]) + jax.tree.leaves(before["opt_state"])):
    np.testing.assert_array_equal(x, y)
  state, metrics = step(state, sharding.shard_batch(_batch(0), mesh))
  assert bool(metrics["applied"])  # guard: a normal batch is applied


_VISION_DECAYED = [f"vision/layers/{m}/kernel" for m in ("fc1", "fc2", "k_proj", "out_proj", "q_proj", "v_proj")] + [
    "vision/patch_embedding", "vision/position_embedding"]
_LLM_DECAYED = ["llm/embed_tokens/embedding", "llm/lm_head/kernel"] + [
    f"llm/layers/mlp/{m}/kernel" for m in ("down_proj", "gate_proj", "up_proj")] + [
    f"llm/layers/self_attn/{m}/kernel" for m in ("k_proj", "o_proj", "q_proj", "v_proj")]
_CROSS_MATRICES = [f"{m}/kernel" for m in ("ffn/down_proj", "ffn/up_proj", "k_proj", "o_proj", "q_proj", "v_proj")]
_PROJECTOR_DECAYED = ["projector/linear_1/kernel", "projector/linear_2/kernel"]
DECAYED = {  # the exact decayed paths of each mode's stacked tree (tiny preset)
    "self": _VISION_DECAYED + _PROJECTOR_DECAYED + _LLM_DECAYED,
    "composite": _VISION_DECAYED + _PROJECTOR_DECAYED + _LLM_DECAYED,
    "cross+resampler": _VISION_DECAYED + _PROJECTOR_DECAYED + _LLM_DECAYED + [f"llm/cross/{m}" for m in _CROSS_MATRICES]
                       + [f"resampler/layers/{m}" for m in _CROSS_MATRICES],
    # OpenFlamingo's shape: media at the tower's width, no projector
    "cross+resampler, vision width": _VISION_DECAYED + _LLM_DECAYED + [f"llm/cross/{m}" for m in _CROSS_MATRICES]
                                     + [f"resampler/layers/{m}" for m in _CROSS_MATRICES],
}
DECAY_CONFIGS = {"self": dict(attention="self", visual_ffn=True), "composite": dict(attention="composite"),
                 "cross+resampler": dict(attention="cross", cross_every=1, resampler_latents=3, resampler_depth=2),
                 "cross+resampler, vision width": dict(attention="cross", cross_every=1, resampler_latents=3,
                                                       resampler_depth=2, cross_heads=2, cross_head_dim=8,
                                                       cross_media_width="vision")}


@pytest.mark.parametrize("mode", list(DECAYED))
@pytest.mark.slow
def test_weight_decay_reaches_matrices_and_embeddings_only(mode):
  """Decay by role (the parameter's name), not by rank: the layer axis of scanned stacks gives
  norm scales, biases, gates and the resampler's latents ndim > 1, and none of them is decayed."""
  from ee_mllm_jax.params import abstract_params, flatten  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax.train.state import decay_mask  # pylint: disable=g-import-not-at-top
  cfg = eem.ModelConfig.preset("tiny", **DECAY_CONFIGS[mode])
  shapes = abstract_params(cfg)
  mask = flatten(decay_mask(shapes))
  assert sorted(k for k, v in mask.items() if v) == sorted(DECAYED[mode])
  stacked_undecayed = [k for k, v in mask.items() if not v and flatten(shapes)[k].ndim > 1]
  assert stacked_undecayed  # guard: the ndim rule would have decayed these (layer-stacked scales, biases, ...)
  # boxed trees (what the train state's init hands AdamW) get the same mask
  assert flatten(nn.meta.unbox(decay_mask(abstract_params(cfg, boxed=True)))) == mask
  # and AdamW decays exactly those: zero gradients, one step
  params = jax.tree.map(lambda s: np.ones(s.shape, np.float32), shapes)
  tx, _ = make_optimizer(OptimConfig(learning_rate=0.1, total_steps=2, warmup_steps=0, weight_decay=0.5, clip_norm=0))
  updates, _ = tx.update(jax.tree.map(np.zeros_like, params), tx.init(params), params)
  moved = {k for k, u in flatten(updates).items() if np.any(np.asarray(u) != 0)}
  assert moved == set(DECAYED[mode])


def test_weight_decay_refuses_a_parameter_of_unknown_role():
  from ee_mllm_jax.train.state import decay_mask  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="'mystery'"):
    decay_mask({"llm": {"mystery": np.ones((2, 3))}})
