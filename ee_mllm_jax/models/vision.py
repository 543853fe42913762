"""ViT vision tower with HF's CLIP and SigLIP math, returning LLaVA-style patch features.

Letters: B images, P patches, D tower width, N heads, H head dim, F MLP width.
Parameter leaves are named as in HF (`q_proj`, `out_proj`, `layer_norm1`, `fc1`,
`pre_layrnorm` [sic, HF's spelling], `post_layernorm`), one level flatter (no `self_attn/`,
`mlp/` scopes inside a layer); `convert/` holds the exact name map.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from ee_mllm_jax.config import VisionConfig
from ee_mllm_jax.models.kernels import attend
from ee_mllm_jax.models.reduction import attention_weights
from ee_mllm_jax.models.layers import ACTIVATIONS, LayerNorm, Linear, layer_slice, logical, scan_layers, stack_view


class VisionLayer(nn.Module):
  """One encoder layer; with `scores` (VisionZip's layer, models/reduction.py) it also returns each
  token's attention received (B, tokens): from the CLS query (CLIP), or the mean over queries
  (SigLIP), averaged over heads; and the keys averaged over heads (B, tokens, H)."""

  cfg: VisionConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  scores: bool = False

  @nn.compact
  def __call__(self, x, _=None):
    c = self.cfg
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    proj = lambda name: Linear((c.width,), (c.num_heads, c.head_dim), ("embed", "heads", "head_dim"),
                               use_bias=True, name=name, **kw)
    h = LayerNorm(c.layer_norm_eps, name="layer_norm1", **kw)(x)
    q, k, v = (proj(n)(h) for n in ("q_proj", "k_proj", "v_proj"))
    # Every patch attends to every patch: no positions, no mask.
    o = attend(q, k, v, impl=c.attention_impl, block=c.attention_block, same_tokens=True)
    x = x + Linear((c.num_heads, c.head_dim), (c.width,), ("heads", "head_dim", "embed"), use_bias=True,
                   name="out_proj", **kw)(o)
    h = LayerNorm(c.layer_norm_eps, name="layer_norm2", **kw)(x)
    act = ACTIVATIONS["quick_gelu" if c.kind == "clip" else "gelu_tanh"]
    h = act(Linear((c.width,), (c.mlp_dim,), ("embed", "mlp"), use_bias=True, name="fc1", **kw)(h))
    x = x + Linear((c.mlp_dim,), (c.width,), ("mlp", "embed"), use_bias=True, name="fc2", **kw)(h)
    if not self.scores:
      return x, None
    w = attention_weights(q, k, None, None, None, None)  # (B, tokens, tokens)
    return x, (w[:, 0] if c.class_token else w.mean(axis=1), k.mean(axis=2))


class VisionTower(nn.Module):
  """(B, image, image, 3) normalised pixels -> (B, P, D) features of `cfg.feature_layer`.

  All `cfg.depth` layers are parameters (checkpoints load and export whole), but only the
  `cfg.num_layers_run` layers the selected feature depends on are computed.
  """

  cfg: VisionConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  remat: str = "none"
  unroll: int | bool = 1

  @nn.compact
  def __call__(self, images, scores: bool = False):
    """-> features (B, P, D); with `scores` also VisionZip's (B, P) scores and (B, P, H) keys of the
    last computed layer (`VisionLayer`)."""
    c = self.cfg
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, p, g = images.shape[0], c.patch_size, c.grid
    patches = images[:, :g * p, :g * p].astype(self.dtype).reshape(b, g, p, g, p, 3)
    # Kernel (p, p, 3, D) is HF's conv weight (D, 3, p, p) transposed; patches in row-major order.
    kernel = self.param("patch_embedding", logical(nn.initializers.lecun_normal(), (None, None, None, "embed")),
                        (p, p, 3, c.width), self.param_dtype)
    x = jnp.einsum("bipjqc,pqcd->bijd", patches, kernel.astype(self.dtype)).reshape(b, g * g, c.width)
    if c.class_token:
      cls = self.param("class_embedding", logical(nn.initializers.normal(0.02), ("embed",)), (c.width,),
                       self.param_dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c.width)), x], axis=1)
    else:
      x = x + self.param("patch_bias", logical(nn.initializers.zeros, ("embed",)), (c.width,),
                         self.param_dtype).astype(self.dtype)
    pos = self.param("position_embedding", logical(nn.initializers.normal(0.02), (None, "embed")),
                     (x.shape[1], c.width), self.param_dtype)
    x = x + pos.astype(self.dtype)
    if c.class_token:
      x = LayerNorm(c.layer_norm_eps, name="pre_layrnorm", **kw)(x)

    n_run, first = c.num_layers_run, 1 if c.class_token else 0
    make = functools.partial(scan_layers, VisionLayer, remat=self.remat, unroll=self.unroll)
    if self.is_initializing():
      x, _ = make(length=c.depth)(c, name="layers", **kw)(x, None)
      LayerNorm(c.layer_norm_eps, name="post_layernorm", **kw)(x)  # HF keeps it; LLaVA's features never use it
      aux = (jnp.zeros(x.shape[:2], jnp.float32), jnp.ones(x.shape[:2] + (1,), x.dtype))  # shapes only
    elif n_run == c.depth and not scores:
      x, _ = make(length=c.depth)(c, name="layers", **kw)(x, None)
    elif not scores:  # read only the first n_run layers of the stacked parameters
      x, _ = stack_view(make(length=n_run), lambda p: layer_slice(p, 0, n_run))(c, name="layers", **kw)(x, None)
    else:
      view = lambda p: {"plain": layer_slice(p, 0, n_run - 1), "last": layer_slice(p, n_run - 1, n_run)}
      x, aux = stack_view(_ScoredLayers, view)(c, self.remat, self.unroll, name="layers", **kw)(x)
    if not scores:
      return x[:, first:]
    return x[:, first:], aux[0][:, first:], aux[1][:, first:]


class _ScoredLayers(nn.Module):
  """The tower's first `num_layers_run` layers with the last one scoring (`VisionLayer.scores`),
  run as a `stack_view` of `layers/`: `plain` reads layers [0, n - 1), `last` layer n - 1."""

  cfg: VisionConfig
  remat: str = "none"
  unroll: int | bool = 1
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    make = functools.partial(scan_layers, VisionLayer, remat=self.remat, unroll=self.unroll)
    if self.cfg.num_layers_run > 1:
      x, _ = make(length=self.cfg.num_layers_run - 1)(self.cfg, name="plain", **kw)(x, None)
    x, aux = make(length=1)(self.cfg, scores=True, name="last", **kw)(x, None)
    return x, tuple(a[0] for a in aux)
