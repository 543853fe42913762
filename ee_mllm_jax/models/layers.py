"""Building blocks shared by the tower and the decoder.

Every parameter carries logical axis names (see `ee_mllm_jax.sharding`): `embed`, `mlp`,
`heads`, `kv_heads`, `head_dim`, `vocab`, and `layers` for the scanned axis.
"""

from __future__ import annotations

import re
import typing
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = jnp.dtype | str


def logical(init, names: Sequence[str | None]):
  return nn.with_logical_partitioning(init, tuple(names))


class Linear(nn.Module):
  """`y = x . kernel (+ bias)`, contracting the trailing `len(in_shape)` axes of x.

  `in_shape`/`features` are kept as tuples so that attention projections hold their natural
  (D, N, H) / (N, H, D) kernels, which makes sharding by head and HF conversion direct.
  With `lora` (a config.LoRA) whose `targets` match this projection's path, it also holds
  adapters `lora_a` (in_shape + (r,)) and `lora_b` ((r,) + features) and adds
  `scale * dropout(x) . lora_a . lora_b`.
  """

  in_shape: tuple[int, ...]
  features: tuple[int, ...]
  names: tuple[str | None, ...]  # logical names of kernel axes: in_shape + features
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: nn.initializers.Initializer = nn.initializers.normal(0.02)
  lora: typing.Any = None  # config.LoRA or None

  def setup(self):
    self.kernel = self.param("kernel", logical(self.kernel_init, self.names),
                             self.in_shape + self.features, self.param_dtype)
    if self.use_bias:
      self.bias = self.param("bias", logical(nn.initializers.zeros, self.names[len(self.in_shape):]),
                             self.features, self.param_dtype)
    # Adapters exist where the parameters hold them; init creates them where `lora.targets` match
    # (a view over a stacked layer axis runs under another path, so apply never matches paths).
    self.adapted = self.has_variable("params", "lora_a") or (
        self.lora is not None and self.is_initializing() and re.match(self.lora.targets, "/".join(self.path)))
    if self.adapted:
      if self.lora is None:
        raise ValueError(f"{'/'.join(self.path)} holds LoRA adapters but the config has no `lora`: set "
                         "llm.lora as in training, or merge the adapters (ee_mllm_jax.lora.merge)")
      n_in, r = len(self.in_shape), self.lora.rank
      a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=tuple(range(n_in)), out_axis=-1)
      self.lora_a = self.param("lora_a", logical(a_init, self.names[:n_in] + (None,)), self.in_shape + (r,),
                               self.param_dtype)
      self.lora_b = self.param("lora_b", logical(nn.initializers.zeros, (None,) + self.names[n_in:]),
                               (r,) + self.features, self.param_dtype)

  def __call__(self, x):
    y = self._project(x, self.kernel.astype(self.dtype))
    return y + self._adapter(x, self.lora_a) if self.adapted else y

  def repeated_input(self, x, repeats: int):
    """Equals `self(jnp.repeat(x, repeats, axis=-len(in_shape)))`: the first input axis of x
    holds in_shape[0] / repeats entries, each feeding `repeats` consecutive kernel rows. The
    kernel rows (and lora_a's) are summed instead of repeating x, which costs `repeats` times
    less (e.g. GQA: o_proj applied to values, each kv head read by G query heads)."""
    if repeats == 1:  # nothing to fold: no reshaped/summed copy of the kernel
      return self(x)
    n0 = self.in_shape[0]
    if n0 % repeats:
      raise ValueError(f"input axis of {n0} does not split into groups of {repeats}")

    def fold(w):
      return w.reshape((n0 // repeats, repeats) + w.shape[1:]).sum(1)

    def folded(x, kernel):
      return self._project(x, fold(kernel.astype(self.dtype)))

    # Recomputed in the backward pass, so the folded kernel is not one more saved residual per layer.
    y = jax.checkpoint(folded)(x, self.kernel)
    return y + self._adapter(x, fold(self.lora_a)) if self.adapted else y

  def _project(self, x, kernel):
    n_in, n_out = len(self.in_shape), len(self.features)
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel, (contract, ((), ())))
    if self.use_bias:
      y = y + self.bias.astype(self.dtype).reshape((1,) * (y.ndim - n_out) + self.features)
    return y

  def _adapter(self, x, lora_a):
    """scale * dropout(x) . lora_a . lora_b (lora_a folded by `repeated_input` where it is)."""
    x = x.astype(self.dtype)
    if self.lora.dropout > 0 and self.has_rng("dropout"):
      keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.lora.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - self.lora.dropout), 0).astype(self.dtype)
    n_in = lora_a.ndim - 1
    h = jax.lax.dot_general(x, lora_a.astype(self.dtype), ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))),
                                                          ((), ())))
    y = jax.lax.dot_general(h, self.lora_b.astype(self.dtype), (((h.ndim - 1,), (0,)), ((), ())))
    return (self.lora.scale * y).astype(self.dtype)


class RMSNorm(nn.Module):
  """HF LlamaRMSNorm: normalise in float32, cast back, then scale."""

  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", logical(nn.initializers.ones, ("embed",)), (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * y.astype(self.dtype)


class LayerNorm(nn.Module):
  """torch.nn.LayerNorm with `scale`/`bias` named for the logical `embed` axis."""

  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param("scale", logical(nn.initializers.ones, ("embed",)), (d,), self.param_dtype)
    bias = self.param("bias", logical(nn.initializers.zeros, ("embed",)), (d,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * scale + bias).astype(self.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling=None) -> np.ndarray:
  """The (H/2,) inverse frequencies, float32, with `scaling` (a config.RopeScaling or None)
  applied as transformers' linear / llama3 RoPE does."""
  half = head_dim // 2
  inv_freq = (1.0 / theta ** (np.arange(half, dtype=np.float32) / half)).astype(np.float32)
  if scaling is None:
    return inv_freq
  if scaling.kind == "linear":
    return (inv_freq / scaling.factor).astype(np.float32)
  old, lo, hi = scaling.original_max_position_embeddings, scaling.low_freq_factor, scaling.high_freq_factor
  wavelen = 2 * np.pi / inv_freq
  scaled = np.where(wavelen > old / lo, inv_freq / scaling.factor, inv_freq)
  smooth = (old / wavelen - lo) / (hi - lo)
  blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = (wavelen >= old / hi) & (wavelen <= old / lo)
  return np.where(medium, blended, scaled).astype(np.float32)


def rope(x: jax.Array, positions: jax.Array, theta: float, scaling=None) -> jax.Array:
  """Rotary embedding in HF's rotate-half layout (pairs are (i, i + H/2)).

  x: (B, S, heads, H); positions: (B, S) integer positions in the interleaved sequence;
  scaling: a config.RopeScaling or None.
  """
  inv_freq = jnp.asarray(rope_frequencies(x.shape[-1], theta, scaling))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, S, H/2)
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
}


class SwiGLU(nn.Module):
  """LLaMA MLP: down_proj(silu(gate_proj(x)) * up_proj(x))."""

  width: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  lora: typing.Any = None  # config.LoRA or None (see Linear)

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)
    up = lambda name: Linear((self.width,), (self.mlp_dim,), ("embed", "mlp"), name=name, **kw)
    h = jax.nn.silu(up("gate_proj")(x)) * up("up_proj")(x)
    h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_mlp"))
    return Linear((self.mlp_dim,), (self.width,), ("mlp", "embed"), name="down_proj", **kw)(h)


def scan_layers(layer_cls, *, length: int, remat: str, unroll, in_axes=nn.broadcast):
  """`nn.scan` over a stack of identical layers, with an optional remat policy.

  The layer is called as `layer(carry, *broadcast_args) -> (carry, per_layer_output)`.
  """
  if remat != "none":
    policy = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[remat]
    layer_cls = nn.remat(layer_cls, policy=policy, prevent_cse=False)
  return nn.scan(
      layer_cls,
      variable_axes={"params": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=in_axes,
      length=length,
      unroll=unroll,
      metadata_params={nn.PARTITION_NAME: "layers"},
  )


def stack_view(module_cls, view):
  """`module_cls` reading its parameters through `view`, a function of the parameters of the
  scope it runs in (slices of a stacked layer axis, regrouped): `nn.map_variables`, a lifted
  transform, so rngs and the other collections reach the layers as in any submodule. Read-only:
  the full stack that the view reads creates the parameters, so paths do not depend on views."""
  return nn.map_variables(module_cls, "params", trans_in_fn=lambda v: {"params": view(nn.meta.unbox(v["params"]))},
                          mutable=False)


def layer_slice(tree, start: int, stop: int):
  """Layers [start, stop) of a tree of stacked (L, ...) arrays."""
  return jax.tree.map(lambda a: a[start:stop], tree)
