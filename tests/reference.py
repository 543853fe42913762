"""Naive full-sequence reference of DESIGN §2, written independently of ee_mllm_jax.models.

One (V+T) x (V+T) masked attention per layer over the concatenated [visual; text] tokens:
  self:      mask = key valid & pos[key] <= pos[query]
  composite: mask = key valid & pos[key] <= pos[query] & (query is text | key == query)
RoPE is applied through explicit 2x2 rotations, GQA by repeating kv heads, everything float64
in numpy, so a shared bug in the model's helpers cannot hide here.
"""

from __future__ import annotations

import numpy as np


def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _rope(x, pos, theta):  # x (B, L, n, H), pairs (i, i + H/2)
  h = x.shape[-1] // 2
  ang = pos[..., None].astype(np.float64) * (1.0 / theta ** (np.arange(h) / h))  # (B, L, h)
  c, s = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
  a, b = x[..., :h], x[..., h:]
  return np.concatenate([a * c - b * s, a * s + b * c], -1)


def _silu(x):
  return x / (1 + np.exp(-x))


def naive_llm_logits(llm_params, cfg, x_v, input_ids, pos_v, pos_t, valid_v, valid_t):
  """Text logits (B, T, vocab) of the naive form. llm_params: unboxed `params["llm"]`."""
  c = cfg.llm
  p = {k: np.asarray(v, np.float64) for k, v in _flatten(llm_params).items()}
  x_t = p["embed_tokens/embedding"][np.asarray(input_ids)]
  x = np.concatenate([np.asarray(x_v, np.float64), x_t], 1)
  pos = np.concatenate([pos_v, pos_t], 1)
  valid = np.concatenate([valid_v, valid_t], 1)
  n_vis, n_all = x_v.shape[1], x.shape[1]
  is_text = np.arange(n_all) >= n_vis
  mask = valid[:, None, :] & (pos[:, None, :] <= pos[:, :, None])
  if cfg.attention == "composite":
    mask &= (is_text[:, None] | np.eye(n_all, dtype=bool))[None]
  ffn_rows = np.ones(n_all, bool) if cfg.runs_visual_ffn else is_text
  g = c.num_heads // c.num_kv_heads
  for i in range(c.depth):
    L = {k[len("layers/"):]: v[i] for k, v in p.items() if k.startswith("layers/")}
    h = _rms(x, L["input_layernorm/scale"], c.rms_norm_eps)
    q = np.einsum("bld,dnh->blnh", h, L["self_attn/q_proj/kernel"])
    k = np.einsum("bld,dnh->blnh", h, L["self_attn/k_proj/kernel"])
    v = np.einsum("bld,dnh->blnh", h, L["self_attn/v_proj/kernel"])
    if c.qkv_bias:
      q, k, v = q + L["self_attn/q_proj/bias"], k + L["self_attn/k_proj/bias"], v + L["self_attn/v_proj/bias"]
    q, k = _rope(q, pos, c.rope_theta), _rope(k, pos, c.rope_theta)
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(c.head_dim)
    s = np.where(mask[:, None], s, -np.inf)
    s = s - np.max(np.where(np.isfinite(s), s, -1e300), -1, keepdims=True)
    w = np.where(mask[:, None], np.exp(s), 0.0)
    w = w / np.maximum(w.sum(-1, keepdims=True), 1e-300)
    o = np.einsum("bnqk,bknh->bqnh", w, v)
    x = x + np.einsum("bqnh,nhd->bqd", o, L["self_attn/o_proj/kernel"])
    h = _rms(x, L["post_attention_layernorm/scale"], c.rms_norm_eps)
    f = np.einsum("blf,fd->bld", _silu(h @ L["mlp/gate_proj/kernel"]) * (h @ L["mlp/up_proj/kernel"]),
                  L["mlp/down_proj/kernel"])
    x = x + f * ffn_rows[None, :, None]
  h = _rms(x[:, n_vis:], p["norm/scale"], c.rms_norm_eps)
  w_out = p["embed_tokens/embedding"].T if c.tie_embeddings else p["lm_head/kernel"]
  return h @ w_out


def _flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    name = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, name + "/"))
    else:
      out[name] = v
  return out
