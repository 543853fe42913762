"""Cross mode in the trainer, on 8 simulated CPU devices: a (2,2,2)-mesh step equals the
single-device step, and the Flamingo recipe's regex trains the new parameters (blocks,
resampler, projector) while the LLM and the tower stay bit-identical with no optimizer state."""

import functools
import sys

import jax
import numpy as np
import pytest

import ee_mllm_jax as eem
from batches import make_batch
from tolerances import assert_grads_close, assert_params_within_update_bound
from conftest import ROOT
from test_train import PLANS
from ee_mllm_jax import loading, sharding
from ee_mllm_jax.config import ModelConfig
from ee_mllm_jax.train.state import OptimConfig, create_sharded_state, make_init_fn, make_optimizer
from ee_mllm_jax.train.step import make_gradient_fn, make_train_step

sys.path.insert(0, ROOT)
from configs import flamingo_7b  # noqa: E402  pylint: disable=g-import-not-at-top

# remat: the group scan under the trainer's gradient checkpointing (as the 7B recipe runs it)
CFG = eem.ModelConfig.preset("tiny", attention="cross", cross_every=1, resampler_latents=3, resampler_depth=1,
                             remat="full")
# The recipe's shape: cross heads of their own, media at the tower's width, no projector
OPENFLAMINGO_SHAPE = CFG.replace(cross_heads=2, cross_head_dim=8, cross_media_width="vision")
TRAINABLE = flamingo_7b.get_config().optim.trainable
STEPS = 2
# Open gates, as in the middle of training: with the initial zeros the first step moves only the
# gates and the blocks' gradients are ~0, where Adam turns float noise into visible differences.
OPEN_GATES = {"llm": {"cross": {g: np.full((CFG.cross_blocks,), 0.5, np.float32) for g in ("attn_gate", "ff_gate")}}}


def _batch(seed, cfg=CFG):
  batch = make_batch(cfg, PLANS, max_images=1, seed=seed)
  rng = np.random.default_rng(seed + 1)
  labels = rng.integers(0, CFG.llm.vocab_size, batch["labels"].shape).astype(np.int32)
  batch["labels"] = np.where(batch["text_valid"], labels, -100)
  return batch


@functools.cache
def _run(mesh_shape, cfg=CFG):
  mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[:int(np.prod(mesh_shape))])
  model = eem.EEMLLM(cfg)
  tx, schedule = make_optimizer(OptimConfig(learning_rate=1e-2, total_steps=10, warmup_steps=1,
                                            trainable=TRAINABLE))
  init, shardings, _ = create_sharded_state(make_init_fn(model, tx, TRAINABLE), mesh)
  step = jax.jit(make_train_step(model, tx, schedule, TRAINABLE, 1),
                 in_shardings=(shardings, sharding.batch_sharding(mesh, (len(PLANS),))),
                 out_shardings=(shardings, None), donate_argnums=0)
  state = init(OPEN_GATES)  # partial initialisation: the gates from here, the rest fresh
  grads, _, _ = jax.jit(make_gradient_fn(model, TRAINABLE))(
      state["params"], sharding.shard_batch(_batch(0, cfg), mesh), jax.random.fold_in(state["rng"], 0))
  before, losses, grads = jax.device_get(state["params"]), [], jax.device_get(grads)
  for i in range(STEPS):
    state, metrics = step(state, sharding.shard_batch(_batch(i, cfg), mesh))
    losses.append(float(metrics["loss"]))
  return state, losses, before, grads, [schedule(i) for i in range(STEPS)]


@pytest.mark.slow
def test_cross_sharded_step_equals_single_device_step():
  """Same loss and first-step gradients to rounding, parameters within the update bound
  (tolerances.py)."""
  state, losses, _, grads, learning_rates = _run((2, 2, 2))
  ref_state, ref_losses, _, ref_grads, _ = _run((1, 1, 1))
  q = state["params"]["llm"]["cross"]["q_proj"]["kernel"]  # (groups, embed, heads, head_dim)
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert losses[0] != losses[-1]
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert_grads_close(grads, ref_grads)
  assert_params_within_update_bound(jax.device_get(state["params"]), jax.device_get(ref_state["params"]), learning_rates)


@pytest.mark.parametrize("cfg", [CFG, OPENFLAMINGO_SHAPE], ids=["llm-width", "openflamingo-shape"])
@pytest.mark.slow
def test_flamingo_recipe_trains_only_the_new_parameters(cfg):
  state, _, before, _, _ = _run((2, 2, 2), cfg)
  after = jax.device_get(state["params"])
  new = [k for k in ("projector", "resampler") if k in after]
  assert new == (["projector", "resampler"] if cfg.has_projector else ["resampler"])
  frozen = {"vision": after["vision"], "llm": {k: v for k, v in after["llm"].items() if k != "cross"}}
  frozen_before = {"vision": before["vision"], "llm": {k: v for k, v in before["llm"].items() if k != "cross"}}
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(frozen_before), jax.tree.leaves(frozen)):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
  trained = {k: after[k] for k in new} | {"cross": after["llm"]["cross"]}
  trained_before = {k: before[k] for k in new} | {"cross": before["llm"]["cross"]}
  unchanged = [jax.tree_util.keystr(p) for (p, x), y in zip(jax.tree_util.tree_leaves_with_path(trained_before),
                                                             jax.tree.leaves(trained)) if np.array_equal(x, y)]
  assert not unchanged, unchanged
  moments = [x for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0]
  assert len(moments) == 2 * len(jax.tree.leaves(trained))  # Adam's mu and nu, new parameters only


def test_cross_settings_matter_only_between_cross_checkpoints():
  """A self checkpoint starts a cross run whatever its cross settings (only the mode is warned
  about); between two cross models, a different block layout is a different model."""
  saved = ModelConfig.preset("tiny", attention="self", visual_ffn=True)
  loading.check_model_config(saved, CFG, "ckpt")  # differs in attention, cross_every, resampler_*: no error
  with pytest.raises(loading.ConfigMismatchError, match="mode.cross_every: checkpoint 2 vs run"):
    loading.check_model_config(CFG.replace(cross_every=2), CFG, "ckpt")
