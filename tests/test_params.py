"""Partial initialisation (load what exists, initialise the rest, report both), the aligner's
folded projection, and the decoder layer's explicit phases."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ee_mllm_jax as eem
from ee_mllm_jax import params as params_lib
from ee_mllm_jax import sharding
from ee_mllm_jax.models.layers import Linear
from ee_mllm_jax.models.llm import DecoderLayer
from ee_mllm_jax.train.state import OptimConfig, create_sharded_state, make_init_fn, make_optimizer
from models import init_params

CFG = eem.ModelConfig.preset("tiny")


def test_overlay_loads_what_exists_and_reports_both_lists():
  fresh, source = init_params(CFG, seed=0), init_params(CFG, seed=1)
  partial = {"vision": source["vision"], "llm": source["llm"], "extra": {"gate": np.zeros(())}}
  params, report = params_lib.overlay(fresh, partial)
  flat, src, new = (params_lib.flatten(t) for t in (params, source, fresh))
  assert set(report.loaded) == {k for k in flat if not k.startswith("projector/")}
  assert set(report.initialised) == {k for k in flat if k.startswith("projector/")} != set()
  assert report.unused == ("extra/gate",)
  for k, v in flat.items():
    np.testing.assert_array_equal(v, (new if k.startswith("projector/") else src)[k])
  assert "initialised (projector/linear_1, projector/linear_2)" in str(report)
  with pytest.raises(ValueError, match="extra/gate"):
    params_lib.overlay(fresh, partial, strict=True)


def test_a_source_for_another_shape_is_refused_naming_the_parameter():
  fresh = init_params(CFG)
  wide = init_params(CFG.replace(llm=CFG.llm.replace(mlp_dim=96)))
  with pytest.raises(ValueError, match=r"llm/layers/mlp/down_proj/kernel: source \(2, 96, 64\), model \(2, 128, 64\)"):
    params_lib.overlay(fresh, {"llm": wide["llm"]})


@pytest.mark.slow
def test_sharded_train_state_from_a_partial_source():
  """A fresh projector over pretrained towers, born sharded on a (2, 2, 2) mesh."""
  mesh = sharding.make_mesh((2, 2, 2))
  tx, _ = make_optimizer(OptimConfig(trainable="projector/"))
  init, shardings, abstract = create_sharded_state(make_init_fn(eem.EEMLLM(CFG), tx, "projector/", seed=3), mesh)
  source = init_params(CFG, seed=1)
  partial = {g: jax.device_put(source[g], shardings["params"][g]) for g in ("vision", "llm")}
  expected = jax.device_get(partial)
  state = init(partial)
  fresh = jax.device_get(init()["params"])
  for g in ("vision", "llm"):
    for x, y in zip(jax.tree.leaves(state["params"][g]), jax.tree.leaves(expected[g])):
      np.testing.assert_array_equal(np.asarray(x), y)
  for x, y in zip(jax.tree.leaves(state["params"]["projector"]), jax.tree.leaves(fresh["projector"])):
    np.testing.assert_array_equal(np.asarray(x), y)
  q = state["params"]["llm"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding == shardings["params"]["llm"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert jax.tree.structure(abstract) == jax.tree.structure(state)


def test_repeated_input_equals_the_projection_of_the_repeated_input():
  """The aligner's folded o_proj: o_proj(repeat(v, G)) computed with the kernel summed over G."""
  proj = Linear((8, 4), (16,), ("heads", "head_dim", "embed"), use_bias=True)
  x = jax.random.normal(jax.random.key(0), (2, 3, 2, 4))  # 2 kv heads, each read by 4 query heads
  variables = nn.meta.unbox(proj.init(jax.random.key(1), jnp.repeat(x, 4, axis=-2)))
  variables = jax.tree.map(lambda p: p + 0.1, variables)  # a non-zero bias, added once
  want = proj.apply(variables, jnp.repeat(x, 4, axis=-2))
  got = proj.apply(variables, x, 4, method="repeated_input")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_a_layer_is_told_its_phase_by_a_typed_context():
  layer = DecoderLayer(CFG.llm, "composite", False)
  with pytest.raises(TypeError, match="ForwardContext or an ExtendContext, got dict"):
    layer.init(jax.random.key(0), {"x_t": jnp.zeros((1, 2, 64))}, None, {"pos_t": jnp.zeros((1, 2), jnp.int32)})
