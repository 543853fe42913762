"""Tolerances for equality across two programs, derived from the computation.

Two meshes, or accumulation against one big batch, are two different programs: XLA sums in
another order, so float32 results agree to rounding, not bit for bit, and the last bits differ
from CPU to CPU (AVX-512/AMX kernels sum differently). What is claimed, and at what tolerance:
* the loss and the gradients on the same parameters agree to rounding: each leaf within
  GRAD_ULPS float32 ulps of its module's gradient scale (max |g|), which covers reassociated
  sums of thousands of terms (measured: at most 8 ulps on a 2-core AVX2 machine);
* parameters after optimizer steps differ by at most what the optimizer can move an element:
  AdamW moves each element by up to about lr per step whatever the gradient's size, so a
  near-zero gradient that differs in its last bits can flip an element's step (1e-7 in the
  gradient became 1.2e-6 in a weight on an AVX-512 machine). Two runs are then within
  2 * sum(lr) per element; the gradient check is what catches a wrong program.
"""

import collections

import numpy as np
from flax import traverse_util

GRAD_ULPS = 1024


def assert_grads_close(got, want):
  """Each leaf to GRAD_ULPS ulps of its module's gradient scale. The module's, not the leaf's:
  a key bias has an exactly zero gradient (softmax ignores a shift of every score), so what
  is computed there is pure rounding of sums of terms the size of the key kernel's gradient."""
  flat_got, flat_want = traverse_util.flatten_dict(got), traverse_util.flatten_dict(want)
  assert flat_got.keys() == flat_want.keys()
  module_scale = collections.defaultdict(float)
  for key, y in flat_want.items():
    module_scale[key[:-1]] = max(module_scale[key[:-1]], float(np.max(np.abs(y))))
  assert max(module_scale.values()) > 0, "every gradient is zero: the comparison would check nothing"
  for key, y in flat_want.items():
    atol = GRAD_ULPS * np.finfo(np.float32).eps * module_scale[key[:-1]]
    np.testing.assert_allclose(np.asarray(flat_got[key]), np.asarray(y), rtol=0, atol=atol, err_msg="/".join(key))


def assert_params_within_update_bound(got, want, learning_rates):
  """Parameters after steps with these learning rates, from the same start."""
  bound = 2 * float(sum(learning_rates))
  flat_got, flat_want = traverse_util.flatten_dict(got), traverse_util.flatten_dict(want)
  assert flat_got.keys() == flat_want.keys()
  for key, y in flat_want.items():
    np.testing.assert_allclose(np.asarray(flat_got[key]), np.asarray(y), rtol=0, atol=bound, err_msg="/".join(key))
