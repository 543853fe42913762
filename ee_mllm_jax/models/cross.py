"""Cross mode (Flamingo): gated cross-attention blocks and the perceiver resampler.

Letters: B batch, T text tokens, I image slots, P tokens per image, R resampler latents,
M media tokens per image (R with the resampler, else P), D the LLM's width, E the media's
width (D after the projector; the tower's with `cross_media_width="vision"`), N heads and H head
dim of the cross modules (`cross_heads` / `cross_head_dim`, by default the LLM's), F FFN width
(cross_ffn_mult x D).

Visual tokens never enter the decoder's stream. Before decoder layers k-1, 2k-1, ..., L-1
(OpenFlamingo's placement: (l + 1) % k == 0) a `GatedCrossBlock` (OpenFlamingo's
GatedCrossAttentionBlock) updates the text stream:

    x += tanh(attn_gate) * cross_attn(norm(x) -> q;  media -> k, v)
    x += tanh(ff_gate)   * ffn(ff_norm(x))                 (GELU, no biases)

The FFNs' GELU (the blocks' and the resampler's) is `cross_ffn_activation`: exact (erf) by
default, as OpenFlamingo's nn.GELU() in both, or the tanh approximation.

Gates start at 0, so an untrained block is the identity. Media masking is by position: each
image carries the position of its last token (`media_pos`, (B, I)); a text token sees an image
iff it is valid and placed before the token. "previous" (Flamingo) keeps only the latest such
image, "all" every one. A token that sees no image gets exactly zero from the attention (the
dense `attend` would return the mean of v on a fully masked row). No RoPE: media have no order
within the cross-attention.

`PerceiverResampler` (OpenFlamingo's PerceiverResampler, one frame per image, no time
embeddings) maps each image's P tokens to R learned latents at the media width E: each layer lets
the latents attend to [media; latents] and adds an FFN (4 x E); a final LayerNorm.
"""

from __future__ import annotations

import typing

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from ee_mllm_jax.config import LLMConfig
from ee_mllm_jax.mode import Cross
from ee_mllm_jax.models.kernels import attend
from ee_mllm_jax.models.layers import LayerNorm, Linear, logical, scan_layers


@flax.struct.dataclass
class MediaContext:
  """What the cross blocks read besides their keys/values. Text positions (B, T), each image's
  last position and validity (B, I), and the media (B, I, M, E) the keys/values are computed from
  (forward phase; None when they come from the cache)."""

  pos_t: jax.Array
  media_pos: jax.Array
  media_valid: jax.Array
  media: jax.Array | None = None


def media_visible(q_pos: jax.Array, media_pos: jax.Array, media_valid: jax.Array) -> jax.Array:
  """(B, T) text positions, (B, I) image positions/validity -> (B, T, I): image placed before the token."""
  return media_valid[:, None, :] & (media_pos[:, None, :] < q_pos[:, :, None])


def cross_attend(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, media_pos: jax.Array,
                 media_valid: jax.Array, media: str, cfg: LLMConfig) -> jax.Array:
  """q (B,T,N,H) text queries, k/v (B,I,M,N,H) media keys/values -> (B,T,N,H), zero where a token
  sees no image."""
  b, i, m = k.shape[:3]
  visible = media_visible(q_pos, media_pos, media_valid)
  kw = dict(impl=cfg.attention_impl, block=cfg.attention_block)
  if media == "all":  # one masked attention over every image's tokens: the position mask does it
    flat = lambda x: x.reshape((b, i * m) + x.shape[3:])
    out = attend(q, flat(k), flat(v), q_pos, jnp.repeat(media_pos, m, axis=1), jnp.repeat(media_valid, m, axis=1),
                 **kw)
  else:  # each token reads one image: attend to every image separately (images folded into the batch), pick
    per_image = attend(jnp.repeat(q, i, axis=0), k.reshape((b * i,) + k.shape[2:]), v.reshape((b * i,) + v.shape[2:]),
                       **kw).reshape((b, i) + q.shape[1:])
    latest = jnp.argmax(jnp.where(visible, media_pos[:, None, :], jnp.iinfo(jnp.int32).min), axis=-1)  # (B, T)
    out = jnp.take_along_axis(per_image, latest[:, None, :, None, None], axis=1)[:, 0]
  return jnp.where(jnp.any(visible, axis=-1)[:, :, None, None], out, jnp.zeros_like(out))


class FeedForward(nn.Module):
  """OpenFlamingo's FeedForward: LayerNorm -> Linear(D, F) -> GELU -> Linear(F, D), no biases.
  `activation`: "gelu" exact (erf), OpenFlamingo's; "gelu_tanh" the tanh approximation (XLA
  charges erf ~8x the elementwise work of tanh on CPU; a cost the FLOP counts leave out)."""

  width: int
  mlp_dim: int
  activation: str = "gelu"
  eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  lora: typing.Any = None  # config.LoRA or None (see layers.Linear)

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = LayerNorm(self.eps, name="norm", **kw)(x)
    kw["lora"] = self.lora
    h = jax.nn.gelu(Linear((self.width,), (self.mlp_dim,), ("embed", "mlp"), name="up_proj", **kw)(h),
                    approximate=self.activation == "gelu_tanh")
    return Linear((self.mlp_dim,), (self.width,), ("mlp", "embed"), name="down_proj", **kw)(h)


def _projections(query_dim: int, kv_dim: int, heads: int, head_dim: int, kw, named: bool = False):
  """Multi-head projections (N heads of H, no GQA, no biases): q from width `query_dim`, k/v from
  `kv_dim`, o back to `query_dim`; `named` gives them their names (compact modules; in setup the
  attribute names them)."""
  name = lambda n: dict(name=n) if named else {}
  proj = lambda n, d: Linear((d,), (heads, head_dim), ("embed", "heads", "head_dim"), **name(n), **kw)
  return (proj("q_proj", query_dim), proj("k_proj", kv_dim), proj("v_proj", kv_dim),
          Linear((heads, head_dim), (query_dim,), ("heads", "head_dim", "embed"), **name("o_proj"), **kw))


class GatedCrossBlock(nn.Module):
  """Text stream (B,T,D) += gated cross-attention to the media, then a gated FFN (`update`).
  Stacked over the decoder's groups, its parameters sit under `llm/cross/` (`models.llm.CrossGroup`
  runs it inside each group)."""

  cfg: LLMConfig
  cross: Cross  # the mode: media masking, FFN width and activation, heads
  media_dim: int  # E, the media's width (keys/values' input)
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    c, x, kw = self.cfg, self.cross, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.norm = LayerNorm(**kw)
    self.q_proj, self.k_proj, self.v_proj, self.o_proj = _projections(
        c.width, self.media_dim, *x.attention_shape(c.num_heads, c.head_dim), dict(kw, lora=c.lora))
    self.ffn = FeedForward(c.width, x.ffn_mult * c.width, x.ffn_activation, lora=c.lora, **kw)
    gate = lambda name: self.param(name, logical(nn.initializers.zeros, ()), (), self.param_dtype)
    self.attn_gate, self.ff_gate = gate("attn_gate"), gate("ff_gate")

  def __call__(self, x_t, media_ctx: MediaContext):
    """The whole block from the media (a scanned step: -> (new x_t, None)); creates the parameters."""
    kv = self.keys_values(media_ctx.media)
    return self.update(x_t, media_ctx.pos_t, kv, media_ctx.media_pos, media_ctx.media_valid), None

  def keys_values(self, media: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(B, I, M, E) media -> keys and values (B, I, M, N, H): what the cache keeps per block."""
    return self.k_proj(media), self.v_proj(media)

  def update(self, x_t, q_pos, kv, media_pos, media_valid):
    """x_t (B,T,D) at positions (B,T); kv = keys_values(media); media_pos/valid (B,I) -> new x_t."""
    q = self.q_proj(self.norm(x_t))
    a = self.o_proj(cross_attend(q, *kv, q_pos, media_pos, media_valid, self.cross.media, self.cfg))
    x_t = x_t + jnp.tanh(self.attn_gate).astype(self.dtype) * a
    return x_t + jnp.tanh(self.ff_gate).astype(self.dtype) * self.ffn(x_t)


class ResamplerLayer(nn.Module):
  """Latents (B,R,E) attend to [media (B,P,E); latents] (each normed), residual; FFN (4 x E), residual."""

  cfg: LLMConfig
  cross: Cross
  width: int  # E
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, latents, media):
    c, x, kw = self.cfg, self.cross, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q_proj, k_proj, v_proj, o_proj = _projections(self.width, self.width, *x.attention_shape(c.num_heads, c.head_dim),
                                                  dict(kw, lora=c.lora), named=True)
    h_m, h_l = LayerNorm(name="media_norm", **kw)(media), LayerNorm(name="latent_norm", **kw)(latents)
    both = jnp.concatenate([h_m, h_l], axis=1)
    latents = latents + o_proj(attend(q_proj(h_l), k_proj(both), v_proj(both), impl=c.attention_impl,
                                      block=c.attention_block))
    ffn = FeedForward(self.width, 4 * self.width, x.ffn_activation, name="ffn", lora=c.lora, **kw)
    return latents + ffn(latents), None


class PerceiverResampler(nn.Module):
  """(B, I, P, E) media -> (B, I, R, E) latents per image (`cross.resampler_latents`, `_depth` layers)."""

  cfg: LLMConfig
  cross: Cross
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  remat: str = "none"
  unroll: int | bool = 1

  @nn.compact
  def __call__(self, media):
    b, i, p, d = media.shape
    r = self.cross.resampler_latents
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    latents = self.param("latents", logical(nn.initializers.normal(1.0), ("latents", "embed")), (r, d),
                         self.param_dtype)
    x = jnp.broadcast_to(latents.astype(self.dtype), (b * i, r, d))
    stack = scan_layers(ResamplerLayer, length=self.cross.resampler_depth, remat=self.remat, unroll=self.unroll)
    x, _ = stack(self.cfg, self.cross, d, name="layers", **kw)(x, media.reshape(b * i, p, d).astype(self.dtype))
    return LayerNorm(name="norm", **kw)(x).reshape(b, i, r, d)
