"""Device meshes, the logical-axis rules table, and helpers that place arrays on a mesh.

Mesh axes:
  data    pure data parallelism (parameters replicated)
  fsdp    data parallelism with parameters and optimizer state sharded (ZeRO-3 style)
  tensor  tensor (model) parallelism over heads, MLP width and vocabulary

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv_heads`,
`head_dim`, `vocab`, `layers`, `latents`; the cross blocks and the resampler reuse the
decoder's names, their stacks the `layers` axis) and activations are constrained with `activation_*` names;
`LOGICAL_AXIS_RULES` below is the one place that maps both to mesh axes. A dimension whose
size does not divide by its mesh axes is left unsharded (small towers, odd vocabularies),
so every preset runs on every mesh.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over every data-parallel axis

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("latents", None),  # the perceiver resampler's learned latents (cross mode)
    # activations
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
)


def make_mesh(shape: Mapping[str, int] | Sequence[int], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh with Auto axis types; one size may be -1 (the rest).

  `shape` is a mapping with the three axis names or a 3-sequence in that order.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = [int(shape[a]) for a in MESH_AXES] if isinstance(shape, Mapping) else [int(s) for s in shape]
  if len(sizes) != len(MESH_AXES):
    raise ValueError(f"mesh shape needs {len(MESH_AXES)} sizes {MESH_AXES}, got {sizes}")
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {sizes}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not divide by the fixed mesh axes {sizes}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, have {len(devices)}")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def _axis_size(mesh, axes) -> int:
  axes = (axes,) if isinstance(axes, str) else (axes or ())
  return math.prod(mesh.shape[a] for a in axes)


def fit_spec(spec: P, shape: Sequence[int], mesh: jax.sharding.Mesh) -> P:
  """`spec` with the mesh axes of non-dividing dimensions dropped (None), trailing Nones trimmed."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  fitted = [axes if axes is not None and dim % _axis_size(mesh, axes) == 0 else None
            for axes, dim in zip(entries, shape)]
  while fitted and fitted[-1] is None:
    fitted.pop()
  return P(*fitted)


def logical_to_sharding(logical_spec: P | None, shape: Sequence[int], mesh: jax.sharding.Mesh,
                        rules=LOGICAL_AXIS_RULES) -> NamedSharding:
  """A logical PartitionSpec (names like `embed`) -> a NamedSharding on `mesh` that fits `shape`."""
  mesh_spec = nn.logical_to_mesh_axes(tuple(logical_spec), rules) if logical_spec else P()
  return NamedSharding(mesh, fit_spec(mesh_spec, shape, mesh))


def tree_shardings(boxed_abstract, mesh: jax.sharding.Mesh, rules=LOGICAL_AXIS_RULES):
  """Shardings for every leaf of a (possibly nn.LogicallyPartitioned-boxed) abstract tree.

  Boxed leaves use their logical names; plain leaves (step, optimizer counts, RNG) are
  replicated. The result has the structure of `nn.meta.unbox(boxed_abstract)`.
  """
  specs = nn.get_partition_spec(boxed_abstract)
  shapes = nn.meta.unbox(boxed_abstract)
  return jax.tree.map(lambda spec, x: logical_to_sharding(spec, x.shape, mesh, rules), specs, shapes,
                      is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: jax.sharding.Mesh, shape: Sequence[int]) -> NamedSharding:
  """Rows over the data-parallel axes, the rest replicated (falls back when rows do not divide)."""
  return NamedSharding(mesh, fit_spec(P(BATCH_AXES), shape, mesh))


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
  """How many ways the batch dimension is split (the product of the data-parallel axes)."""
  return _axis_size(mesh, BATCH_AXES)


def shard_batch(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Per-process host batches -> global arrays; each process passes its own rows.

  The global batch is the concatenation of the processes' batches along the rows, in
  process order (`jax.make_array_from_process_local_data`).
  """
  out = {}
  for key, local in batch.items():
    local = np.asarray(local)
    global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
    out[key] = jax.make_array_from_process_local_data(batch_sharding(mesh, global_shape), local, global_shape)
  return out


def maybe_initialize_distributed(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
                                 timeout_s: int = 300) -> bool:
  """`jax.distributed.initialize` when flags or a cluster environment ask for several processes.

  Explicit flags win; otherwise JAX's own auto-detection is used when the environment names
  a coordinator (JAX_COORDINATOR_ADDRESS) or a multi-task SLURM / Open MPI job. Returns
  whether it initialised.
  """
  if coordinator_address:
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes or None,
                               process_id=process_id if process_id >= 0 else None,
                               initialization_timeout=timeout_s)
    return True
  env = os.environ
  multi = (env.get("JAX_COORDINATOR_ADDRESS")
           or int(env.get("SLURM_NTASKS", "1")) > 1
           or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)
  if multi:
    jax.distributed.initialize(initialization_timeout=timeout_s)
    return True
  return False
