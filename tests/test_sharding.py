"""The mesh helper and the one logical-axis rules table."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import ee_mllm_jax as eem
from batches import make_batch
from ee_mllm_jax import sharding


def test_make_mesh_fills_the_rest_and_uses_auto_axes():
  mesh = sharding.make_mesh({"data": 2, "fsdp": -1, "tensor": 2})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert dict(sharding.make_mesh((1, -1, 1)).shape)["fsdp"] == jax.device_count()
  with pytest.raises(ValueError):
    sharding.make_mesh((3, -1, 1))


def test_rules_map_parameter_axes_and_drop_non_dividing_dims():
  mesh = sharding.make_mesh((2, 2, 2))
  assert sharding.logical_to_sharding(P("embed", "mlp"), (64, 128), mesh).spec == P("fsdp", "tensor")
  assert sharding.logical_to_sharding(P("layers", "embed", "heads", "head_dim"), (2, 64, 4, 16), mesh).spec == \
      P(None, "fsdp", "tensor")
  # 3 kv heads do not split over tensor=2: that dimension stays whole
  assert sharding.logical_to_sharding(P("embed", "kv_heads", "head_dim"), (64, 3, 16), mesh).spec == P("fsdp")
  assert sharding.batch_sharding(mesh, (8, 5)).spec == P(("data", "fsdp"))
  assert sharding.batch_sharding(mesh, (6, 5)).spec == P()


def test_every_parameter_of_the_tiny_model_gets_a_fitting_sharding():
  cfg = eem.ModelConfig.preset("tiny")
  batch = make_batch(cfg, [[3, "img", 4]])
  mesh = sharding.make_mesh((2, 2, 2))
  boxed = jax.eval_shape(lambda: eem.EEMLLM(cfg).init(jax.random.key(0), **batch)["params"])
  shardings = sharding.tree_shardings(boxed, mesh)
  shapes = nn.meta.unbox(boxed)
  assert jax.tree.structure(shardings) == jax.tree.structure(shapes)
  q = shardings["llm"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.spec == P(None, "fsdp", "tensor")  # (layers, embed, heads, head_dim)
  for s, x in zip(jax.tree.leaves(shardings), jax.tree.leaves(shapes)):
    s.shard_shape(x.shape)  # raises if a dimension does not divide


def test_shard_batch_places_rows_over_data_axes():
  mesh = sharding.make_mesh((2, 2, 2))
  batch = {"x": np.arange(8 * 3).reshape(8, 3)}
  out = sharding.shard_batch(batch, mesh)["x"]
  assert out.sharding.spec == P(("data", "fsdp"))
  np.testing.assert_array_equal(np.asarray(out), batch["x"])
