"""Import HF LLaVA checkpoints (CLIP or SigLIP tower, LLaMA or Qwen2 decoder) from safetensors.

Only safetensors are read (no pickle). Conversion is a declarative name map (ours -> HF)
plus three small hooks: transpose a torch Linear, split heads, stack the layers of a scanned
stack. Key prefixes differ between transformers versions (`vision_tower.vision_model.` vs
`vision_tower.`, `language_model.model.` vs `model.language_model.`); all are accepted.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Callable, Mapping

import numpy as np

from ee_mllm_jax.config import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, LLMConfig, ModelConfig, VisionConfig

Tensors = Mapping[str, np.ndarray]

# Canonical prefixes and the aliases other transformers versions write.
_ALIASES = {
    "vision_tower.": ("vision_tower.vision_model.", "model.vision_tower.vision_model.", "model.vision_tower."),
    "language_model.model.": ("model.language_model.",),
    "language_model.lm_head.": ("lm_head.",),
    "multi_modal_projector.": ("model.multi_modal_projector.",),
}


def canonical_names(tensors: Tensors) -> dict[str, np.ndarray]:
  out = {}
  for name, value in tensors.items():
    for canon, aliases in _ALIASES.items():
      alias = next((a for a in aliases if name.startswith(a)), None)
      if alias is not None:
        name = canon + name[len(alias):]
        break
    out[name] = value
  return out


def _linear(w):  # torch Linear (out, in) -> kernel (in, out)
  return np.asarray(w).T


def _heads_in(n, h):  # q/k/v: (n*h, d) -> (d, n, h); bias (n*h,) -> (n, h)
  return lambda w: _linear(w).reshape(-1, n, h) if w.ndim == 2 else np.asarray(w).reshape(n, h)


def _heads_out(n, h):  # o_proj/out_proj: (d, n*h) -> (n, h, d)
  return lambda w: _linear(w).reshape(n, h, -1)


_same = np.asarray


def _vision_map(c: VisionConfig) -> dict[str, tuple[str, Callable]]:
  """Our leaf path (under vision/) -> (HF name under vision_tower., hook); `{i}` = layer."""
  n, h = c.num_heads, c.head_dim
  m = {
      "patch_embedding": ("embeddings.patch_embedding.weight", lambda w: np.transpose(w, (2, 3, 1, 0))),
      "position_embedding": ("embeddings.position_embedding.weight", _same),
      "post_layernorm/scale": ("post_layernorm.weight", _same),
      "post_layernorm/bias": ("post_layernorm.bias", _same),
  }
  if c.class_token:
    m["class_embedding"] = ("embeddings.class_embedding", _same)
    m["pre_layrnorm/scale"] = ("pre_layrnorm.weight", _same)
    m["pre_layrnorm/bias"] = ("pre_layrnorm.bias", _same)
  else:
    m["patch_bias"] = ("embeddings.patch_embedding.bias", _same)
  layer = "encoder.layers.{i}."
  for ln in ("layer_norm1", "layer_norm2"):
    m[f"layers/{ln}/scale"] = (layer + f"{ln}.weight", _same)
    m[f"layers/{ln}/bias"] = (layer + f"{ln}.bias", _same)
  for p in ("q_proj", "k_proj", "v_proj"):
    for leaf, suffix in (("kernel", "weight"), ("bias", "bias")):
      m[f"layers/{p}/{leaf}"] = (layer + f"self_attn.{p}.{suffix}", _heads_in(n, h))
  m["layers/out_proj/kernel"] = (layer + "self_attn.out_proj.weight", _heads_out(n, h))
  m["layers/out_proj/bias"] = (layer + "self_attn.out_proj.bias", _same)
  for fc in ("fc1", "fc2"):
    m[f"layers/{fc}/kernel"] = (layer + f"mlp.{fc}.weight", _linear)
    m[f"layers/{fc}/bias"] = (layer + f"mlp.{fc}.bias", _same)
  return {k: ("vision_tower." + name, hook) for k, (name, hook) in m.items()}


def _llm_map(c: LLMConfig) -> dict[str, tuple[str, Callable]]:
  pre, layer = "language_model.model.", "language_model.model.layers.{i}."
  m = {
      "embed_tokens/embedding": (pre + "embed_tokens.weight", _same),
      "norm/scale": (pre + "norm.weight", _same),
      "layers/input_layernorm/scale": (layer + "input_layernorm.weight", _same),
      "layers/post_attention_layernorm/scale": (layer + "post_attention_layernorm.weight", _same),
      "layers/self_attn/q_proj/kernel": (layer + "self_attn.q_proj.weight", _heads_in(c.num_heads, c.head_dim)),
      "layers/self_attn/k_proj/kernel": (layer + "self_attn.k_proj.weight", _heads_in(c.num_kv_heads, c.head_dim)),
      "layers/self_attn/v_proj/kernel": (layer + "self_attn.v_proj.weight", _heads_in(c.num_kv_heads, c.head_dim)),
      "layers/self_attn/o_proj/kernel": (layer + "self_attn.o_proj.weight", _heads_out(c.num_heads, c.head_dim)),
  }
  if c.qkv_bias:
    for p, n in (("q_proj", c.num_heads), ("k_proj", c.num_kv_heads), ("v_proj", c.num_kv_heads)):
      m[f"layers/self_attn/{p}/bias"] = (layer + f"self_attn.{p}.bias", _heads_in(n, c.head_dim))
  for p in ("gate_proj", "up_proj", "down_proj"):
    m[f"layers/mlp/{p}/kernel"] = (layer + f"mlp.{p}.weight", _linear)
  if not c.tie_embeddings:
    m["lm_head/kernel"] = ("language_model.lm_head.weight", _linear)
  return m


def _projector_map(cfg: ModelConfig) -> dict[str, tuple[str, Callable]]:
  names = ("linear_1", "linear_2") if cfg.projector == "mlp2x_gelu" else ("linear_1",)
  m = {}
  for n in names:
    m[f"{n}/kernel"] = (f"multi_modal_projector.{n}.weight", _linear)
    m[f"{n}/bias"] = (f"multi_modal_projector.{n}.bias", _same)
  return m


def name_map(cfg: ModelConfig) -> dict[str, tuple[str, Callable]]:
  """Our flat param path -> (HF tensor name, hook). `{i}` marks a stacked (scanned) layer."""
  out = {}
  for group, m in (("vision", _vision_map(cfg.vision)), ("projector", _projector_map(cfg)), ("llm", _llm_map(cfg.llm))):
    out.update({f"{group}/{k}": v for k, v in m.items()})
  return out


def params_from_hf(tensors: Tensors, cfg: ModelConfig, dtype=np.float32, *, missing: str = "raise") -> dict:
  """HF LLaVA tensors (any key prefix variant) -> our nested params dict (numpy).

  `missing="raise"`: a parameter without its tensor is an error naming both. `missing="skip"`:
  such parameters are left out, and the result is the part the checkpoint covers (to be
  completed by `params.overlay`, e.g. a fresh projector over pretrained towers)."""
  if missing not in ("raise", "skip"):
    raise ValueError(f"missing must be 'raise' or 'skip', got {missing!r}")
  tensors = canonical_names(tensors)
  depth = {"vision": cfg.vision.depth, "llm": cfg.llm.depth}
  params: dict = {}
  used = set()
  for path, (name, hook) in name_map(cfg).items():
    if "{i}" in name:
      names = [name.format(i=i) for i in range(depth[path.split("/")[0]])]
    else:
      names = [name]
    absent = [n for n in names if n not in tensors]
    if absent and missing == "raise":
      raise KeyError(f"checkpoint has no tensor {absent[0]!r} (needed for {path})")
    if absent:
      continue
    values = [hook(np.asarray(tensors[n], np.float32)) for n in names]
    value = np.stack(values) if "{i}" in name else values[0]
    used.update(names)
    node = params
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value.astype(dtype)
  unused = sorted(set(tensors) - used)
  # Heads that LLaVA never uses (CLIP/SigLIP pooling heads) may be present; anything else is an error.
  unused = [n for n in unused if not n.startswith(("vision_tower.head.", "vision_tower.post_layernorm"))]
  if unused:
    raise ValueError(f"checkpoint tensors not mapped to any parameter: {unused[:5]}{'...' if len(unused) > 5 else ''}")
  return params


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a .safetensors file or of every *.safetensors file in a directory."""
  from safetensors.numpy import load_file

  files = sorted(glob.glob(os.path.join(path, "*.safetensors"))) if os.path.isdir(path) else [path]
  if not files:
    raise FileNotFoundError(f"no .safetensors files in {path}")
  tensors = {}
  for f in files:
    tensors.update(load_file(f))
  return tensors


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
  """ModelConfig from a LLaVA `config.json` dict (CLIP/SigLIP vision_config, LLaMA/Qwen2 text_config)."""
  v, t = hf["vision_config"], hf["text_config"]
  siglip = "siglip" in v.get("model_type", "")
  if hf.get("vision_feature_select_strategy", "default") != ("full" if siglip else "default"):
    raise ValueError("only LLaVA's 'default' (CLIP: drop CLS) / 'full' (SigLIP) feature selection is supported")
  layer = hf.get("vision_feature_layer", -2)
  if not isinstance(layer, int):
    raise ValueError(f"multi-layer vision features {layer} are not supported")
  vision = VisionConfig(
      kind="siglip" if siglip else "clip", image_size=v["image_size"], patch_size=v["patch_size"],
      width=v["hidden_size"], depth=v["num_hidden_layers"], num_heads=v["num_attention_heads"],
      mlp_dim=v["intermediate_size"], layer_norm_eps=v.get("layer_norm_eps", 1e-6 if siglip else 1e-5),
      feature_layer=layer, image_mean=SIGLIP_MEAN if siglip else CLIP_MEAN, image_std=SIGLIP_STD if siglip else CLIP_STD)
  n = t["num_attention_heads"]
  rope = t.get("rope_parameters") or {}
  llm = LLMConfig(
      vocab_size=t["vocab_size"], width=t["hidden_size"], depth=t["num_hidden_layers"], num_heads=n,
      num_kv_heads=t.get("num_key_value_heads") or n, head_dim=t.get("head_dim") or t["hidden_size"] // n,
      mlp_dim=t["intermediate_size"], rope_theta=rope.get("rope_theta", t.get("rope_theta", 10000.0)),
      rms_norm_eps=t.get("rms_norm_eps", 1e-6), qkv_bias=t.get("model_type") == "qwen2" or t.get("attention_bias", False),
      tie_embeddings=t.get("tie_word_embeddings", hf.get("tie_word_embeddings", False)))
  act = hf.get("projector_hidden_act", "gelu")
  if act != "gelu":
    raise ValueError(f"projector activation {act!r} is not supported (LLaVA uses exact GELU)")
  cfg = ModelConfig(vision=vision, llm=llm, projector="mlp2x_gelu", attention="self", visual_ffn=True)
  return cfg.replace(**overrides) if overrides else cfg


def load_hf_llava(path: str, **overrides) -> tuple[ModelConfig, dict]:
  """A saved HF LLaVA directory (config.json + *.safetensors) -> (ModelConfig, params).

  The config is LLaVA's (self attention, visual FFN on); pass `attention="composite"` for
  EE-MLLM-F, the same weights run with composite attention.
  """
  with open(os.path.join(path, "config.json")) as f:
    cfg = config_from_hf(json.load(f), **overrides)
  return cfg, params_from_hf(read_safetensors(path), cfg)
