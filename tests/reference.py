"""Naive full-sequence reference of docs/design.md ("The three modes"), independent of ee_mllm_jax.models.

One (V+T) x (V+T) masked attention per layer over the concatenated [visual; text] tokens:
  self:      mask = key valid & pos[key] <= pos[query]
  composite: mask = key valid & pos[key] <= pos[query] & (query is text | key == query)
With composite_from_layer=n the mask switches from the first to the second at layer n (and the
visual rows' FFN from on to `visual_ffn`).
RoPE is applied through explicit 2x2 rotations, GQA by repeating kv heads, everything float64
in numpy, so a shared bug in the model's helpers cannot hide here.

Cross mode (Flamingo), `naive_cross_logits`: the decoder runs over text only (causal self mask);
before layer i ((i + 1) % cross_every == 0, OpenFlamingo's placement) a gated block cross-attends
from the text to the media
(per image: the projected tokens, or a perceiver resampler's latents) with an explicit
(T, I*M) media mask -- "all": every valid image placed before the token, "previous": only the
latest such image -- and a token with no visible image gets zero attention output.
"""

from __future__ import annotations

import numpy as np
import scipy.special


def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _rope(x, pos, theta):  # x (B, S, n, H), pairs (i, i + H/2)
  h = x.shape[-1] // 2
  ang = pos[..., None].astype(np.float64) * (1.0 / theta ** (np.arange(h) / h))  # (B, S, h)
  c, s = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
  a, b = x[..., :h], x[..., h:]
  return np.concatenate([a * c - b * s, a * s + b * c], -1)


def _silu(x):
  return x / (1 + np.exp(-x))


def naive_llm_logits(llm_params, cfg, x_v, input_ids, pos_v, pos_t, valid_v, valid_t, kept_out=None):
  """Text logits (B, T, vocab) of the naive form. llm_params: unboxed `params["llm"]`.

  FastV (`cfg.mode.fastv`): at layer K-1 each visual token scores the softmax weight it receives,
  averaged over heads and summed over that layer's queries (valid tokens; text only in a composite
  layer); after that layer each row's ceil((1 - R) V) best valid ones are kept (as many invalid
  ones as needed to fill up), the rest deleted from every array. `kept_out`, a list, receives the
  kept indices (B, V') in original order."""
  c = cfg.llm
  p = {k: np.asarray(v, np.float64) for k, v in _flatten(llm_params).items()}
  x_t = p["embed_tokens/embedding"][np.asarray(input_ids)]
  x = np.concatenate([np.asarray(x_v, np.float64), x_t], 1)
  pos = np.concatenate([pos_v, pos_t], 1)
  valid = np.concatenate([valid_v, valid_t], 1)
  n_vis = x_v.shape[1]
  g = c.num_heads // c.num_kv_heads
  for i in range(c.depth):
    n_all = x.shape[1]
    is_text = np.arange(n_all) >= n_vis
    self_mask = valid[:, None, :] & (pos[:, None, :] <= pos[:, :, None])
    composite_mask = self_mask & (is_text[:, None] | np.eye(n_all, dtype=bool))[None]
    composite = cfg.attention == "composite" and i >= cfg.mode.from_layer
    mask = composite_mask if composite else self_mask
    ffn_rows = is_text if composite and not cfg.mode.visual_ffn else np.ones(n_all, bool)
    L = {k[len("layers/"):]: v[i] for k, v in p.items() if k.startswith("layers/")}
    h = _rms(x, L["input_layernorm/scale"], c.rms_norm_eps)
    q = np.einsum("bsd,dnh->bsnh", h, L["self_attn/q_proj/kernel"])
    k = np.einsum("bsd,dnh->bsnh", h, L["self_attn/k_proj/kernel"])
    v = np.einsum("bsd,dnh->bsnh", h, L["self_attn/v_proj/kernel"])
    if c.qkv_bias:
      q, k, v = q + L["self_attn/q_proj/bias"], k + L["self_attn/k_proj/bias"], v + L["self_attn/v_proj/bias"]
    q, k = _rope(q, pos, c.rope_theta), _rope(k, pos, c.rope_theta)
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bqnh,bsnh->bnqs", q, k) / np.sqrt(c.head_dim)
    s = np.where(mask[:, None], s, -np.inf)
    s = s - np.max(np.where(np.isfinite(s), s, -1e300), -1, keepdims=True)
    w = np.where(mask[:, None], np.exp(s), 0.0)
    w = w / np.maximum(w.sum(-1, keepdims=True), 1e-300)
    o = np.einsum("bnqs,bsnh->bqnh", w, v)
    x = x + np.einsum("bqnh,nhd->bqd", o, L["self_attn/o_proj/kernel"])
    h = _rms(x, L["post_attention_layernorm/scale"], c.rms_norm_eps)
    f = np.einsum("bsf,fd->bsd", _silu(h @ L["mlp/gate_proj/kernel"]) * (h @ L["mlp/up_proj/kernel"]),
                  L["mlp/down_proj/kernel"])
    x = x + f * ffn_rows[None, :, None]
    if cfg.mode.fastv and i == cfg.mode.fastv_layer - 1:
      voters = valid & (is_text if composite else True)
      scores = (w.mean(1) * voters[:, :, None]).sum(1)[:, :n_vis]
      kept = int(np.ceil(round(n_vis * (1 - cfg.mode.fastv_ratio), 6)))
      rank = np.argsort(-np.where(valid[:, :n_vis], scores, -np.inf), axis=1, kind="stable")[:, :kept]
      keep = np.sort(rank, axis=1)
      if kept_out is not None:
        kept_out.append(keep)
      rows = np.arange(x.shape[0])[:, None]
      x, pos, valid = (np.concatenate([a[rows, keep], a[:, n_vis:]], 1) for a in (x, pos, valid))
      n_vis = kept
  h = _rms(x[:, n_vis:], p["norm/scale"], c.rms_norm_eps)
  w_out = p["embed_tokens/embedding"].T if c.tie_embeddings else p["lm_head/kernel"]
  return h @ w_out


def _layer_norm(x, p, name, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p[f"{name}/scale"] + p[f"{name}/bias"]


def _gelu(x, activation="gelu"):  # "gelu": exact, x * Phi(x); "gelu_tanh": the tanh approximation
  if activation == "gelu":
    return 0.5 * x * (1 + scipy.special.erf(x / np.sqrt(2)))
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _ffn(x, p, name, activation):
  h = _layer_norm(x, p, f"{name}/norm")
  return _gelu(h @ p[f"{name}/up_proj/kernel"], activation) @ p[f"{name}/down_proj/kernel"]


def _mha(xq, xkv, p, mask):
  """Plain multi-head attention; mask (B, Q, S) or None; fully masked rows give 0."""
  q = np.einsum("bsd,dnh->bsnh", xq, p["q_proj/kernel"])
  k = np.einsum("bsd,dnh->bsnh", xkv, p["k_proj/kernel"])
  v = np.einsum("bsd,dnh->bsnh", xkv, p["v_proj/kernel"])
  s = np.einsum("bqnh,bsnh->bnqs", q, k) / np.sqrt(q.shape[-1])
  mask = np.ones(s.shape[:1] + s.shape[2:], bool) if mask is None else mask
  s = np.where(mask[:, None], s, -np.inf)
  s = s - np.max(np.where(np.isfinite(s), s, -1e300), -1, keepdims=True)
  w = np.where(mask[:, None], np.exp(s), 0.0)
  w = w / np.maximum(w.sum(-1, keepdims=True), 1e-300)
  return np.einsum("bqnh,nhd->bqd", np.einsum("bnqs,bsnh->bqnh", w, v), p["o_proj/kernel"])


def naive_resampler(params, cfg, media):
  """(B, I, P, D) -> (B, I, R, D): latents attend to [media; latents] per layer, FFN, final norm."""
  p = {k: np.asarray(v, np.float64) for k, v in _flatten(params).items()}
  b, i, n, d = media.shape
  x = np.asarray(media, np.float64).reshape(b * i, n, d)
  lat = np.broadcast_to(p["latents"], (b * i,) + p["latents"].shape)
  for layer in range(cfg.mode.resampler_depth):
    L = {k[len("layers/"):]: v[layer] for k, v in p.items() if k.startswith("layers/")}
    h_m, h_l = _layer_norm(x, L, "media_norm"), _layer_norm(lat, L, "latent_norm")
    lat = lat + _mha(h_l, np.concatenate([h_m, h_l], 1), L, None)
    lat = lat + _ffn(lat, L, "ffn", cfg.mode.ffn_activation)
  return _layer_norm(lat, p, "norm").reshape(b, i, -1, d)


def naive_cross_logits(params, cfg, x_v, input_ids, pos_v, pos_t, image_valid, valid_t, *, blocks_first=False):
  """Text logits (B, T, vocab) of cross mode. params: unboxed whole-model params; x_v (B, I*P, E)
  the visual tokens (projected, or the tower's features with cross_media_width="vision"; heads and
  widths are read from the kernels' shapes, the FFNs' GELU from cfg.mode.ffn_activation),
  pos_v (B, I*P) their positions, image_valid (B, I).
  `blocks_first`: the old, wrong placement (before layers 0, k, 2k, ...), for tests to show the
  placement is checked."""
  c = cfg.llm
  b, n_img = image_valid.shape
  media = np.asarray(x_v, np.float64).reshape(b, n_img, -1, x_v.shape[-1])  # E: the LLM's or the tower's width
  if cfg.mode.resampler_latents:
    media = naive_resampler(params["resampler"], cfg, media)
  m = media.shape[2]
  image_end = np.asarray(pos_v).reshape(b, n_img, -1).max(-1)  # (B, I): last position of each image
  seen = image_valid[:, None, :] & (image_end[:, None, :] < pos_t[:, :, None])  # (B, T, I)
  if cfg.mode.media == "previous":  # only the image with the largest position among the seen ones
    latest = np.argmax(np.where(seen, image_end[:, None, :], -1), -1)
    seen = seen & (np.arange(n_img)[None, None, :] == latest[..., None])
  media_mask = np.repeat(seen, m, axis=2)  # (B, T, I*M)
  media = media.reshape(b, n_img * m, media.shape[-1])
  p = {k: np.asarray(v, np.float64) for k, v in _flatten(params["llm"]).items()}
  x = p["embed_tokens/embedding"][np.asarray(input_ids)]
  mask = valid_t[:, None, :] & (pos_t[:, None, :] <= pos_t[:, :, None])
  g = c.num_heads // c.num_kv_heads
  for i in range(c.depth):
    if (i % cfg.mode.every == 0) if blocks_first else ((i + 1) % cfg.mode.every == 0):
      X = {k[len("cross/"):]: v[i // cfg.mode.every] for k, v in p.items() if k.startswith("cross/")}
      x = x + np.tanh(X["attn_gate"]) * _mha(_layer_norm(x, X, "norm"), media, X, media_mask)
      x = x + np.tanh(X["ff_gate"]) * _ffn(x, X, "ffn", cfg.mode.ffn_activation)
    L = {k[len("layers/"):]: v[i] for k, v in p.items() if k.startswith("layers/")}
    h = _rms(x, L["input_layernorm/scale"], c.rms_norm_eps)
    q = _rope(np.einsum("bsd,dnh->bsnh", h, L["self_attn/q_proj/kernel"]), pos_t, c.rope_theta)
    k = _rope(np.einsum("bsd,dnh->bsnh", h, L["self_attn/k_proj/kernel"]), pos_t, c.rope_theta)
    v = np.einsum("bsd,dnh->bsnh", h, L["self_attn/v_proj/kernel"])
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.where(mask[:, None], np.einsum("bqnh,bsnh->bnqs", q, k) / np.sqrt(c.head_dim), -np.inf)
    w = np.exp(s - np.max(np.where(np.isfinite(s), s, -1e300), -1, keepdims=True))
    w = np.where(mask[:, None], w, 0.0)
    w = w / np.maximum(w.sum(-1, keepdims=True), 1e-300)
    x = x + np.einsum("bqnh,nhd->bqd", np.einsum("bnqs,bsnh->bqnh", w, v), L["self_attn/o_proj/kernel"])
    h = _rms(x, L["post_attention_layernorm/scale"], c.rms_norm_eps)
    x = x + np.einsum("bsf,fd->bsd", _silu(h @ L["mlp/gate_proj/kernel"]) * (h @ L["mlp/up_proj/kernel"]),
                      L["mlp/down_proj/kernel"])
  h = _rms(x, p["norm/scale"], c.rms_norm_eps)
  return h @ (p["embed_tokens/embedding"].T if c.tie_embeddings else p["lm_head/kernel"])


def _flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    name = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, name + "/"))
    else:
      out[name] = v
  return out
