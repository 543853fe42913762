"""HF `config.json` <-> our configs, for partial configs too.

Published checkpoints carry `config.json` files written by older transformers versions,
which store only the values that differ from the class defaults (the text_config of the
public llava-1.5-7b-hf holds max_position_embeddings, rms_norm_eps and vocab_size, nothing
else). Missing keys are filled, as transformers fills them, from each model type's class
defaults, written down below as facts (transformers is not imported here). A sub-config
dict with a `model_type` takes that type's defaults; LLaVA's own defaults (a CLIP-L/336
tower, a LLaMA text model) apply only where a sub-config is absent altogether.
"""

from __future__ import annotations

from typing import Any

from ee_mllm_jax import mode as mode_lib
from ee_mllm_jax.config import (CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, LLMConfig, ModelConfig, RopeScaling,
                                VisionConfig)

# transformers' class defaults, per model type (the keys that matter to the architecture).
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
                  max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                  attention_bias=False, mlp_bias=False),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, head_dim=None, hidden_act="silu",
                  max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                  use_sliding_window=False),
    "clip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                              num_channels=3),
    "siglip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, image_size=224, patch_size=16,
                                hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, num_channels=3),
    # LlavaConfig's own top level; "vision_config" is what it builds when none is given.
    "llava": dict(image_token_index=32000, projector_hidden_act="gelu", vision_feature_select_strategy="default",
                  vision_feature_layer=-2, multimodal_projector_bias=True, tie_word_embeddings=False,
                  vision_config=dict(model_type="clip_vision_model", intermediate_size=4096, hidden_size=1024,
                                     patch_size=14, image_size=336, num_hidden_layers=24, num_attention_heads=16,
                                     vocab_size=32000, projection_dim=768),
                  text_config=dict(model_type="llama")),
}
# A two-tower checkpoint's config.json holds the tower under vision_config.
TWO_TOWER_TYPES = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}
TEXT_TYPES = ("llama", "qwen2")
VISION_TYPES = ("clip_vision_model", "siglip_vision_model")


def with_defaults(d: dict, model_type: str | None = None) -> dict:
  """`d` completed with its model type's defaults (d's values win)."""
  model_type = d.get("model_type", model_type)
  if model_type not in HF_DEFAULTS:
    raise ValueError(f"model_type {model_type!r} is not supported (supported: {sorted(HF_DEFAULTS)})")
  return {**HF_DEFAULTS[model_type], **{k: v for k, v in d.items() if v is not None}, "model_type": model_type}


def rope_scaling_from_hf(t: dict) -> tuple[float, RopeScaling | None]:
  """(rope_theta, scaling) from a text config: transformers 5's `rope_parameters` or the older
  `rope_theta` + `rope_scaling` ({"type" | "rope_type": ..., "factor": ...})."""
  params = dict(t.get("rope_parameters") or {})
  params.update(t.get("rope_scaling") or {})
  theta = float(params.get("rope_theta", t.get("rope_theta", 10000.0)))
  kind = params.get("rope_type", params.get("type", "default"))
  if kind == "default":
    return theta, None
  if kind == "linear":
    return theta, RopeScaling(kind="linear", factor=float(params["factor"]))
  if kind == "llama3":
    original = params.get("original_max_position_embeddings", t.get("max_position_embeddings"))
    return theta, RopeScaling(kind="llama3", factor=float(params["factor"]),
                              low_freq_factor=float(params["low_freq_factor"]),
                              high_freq_factor=float(params["high_freq_factor"]),
                              original_max_position_embeddings=int(original))
  raise ValueError(f"RoPE scaling type {kind!r} is not supported (only linear and llama3 are); importing it "
                   "as plain RoPE would give wrong logits past the original context")


def llm_config_from_hf(t: dict) -> LLMConfig:
  """LLMConfig from a LlamaForCausalLM / Qwen2ForCausalLM config (or a LLaVA text_config)."""
  t = with_defaults(t, "llama")
  kind = t["model_type"]
  if kind not in TEXT_TYPES:
    raise ValueError(f"text model_type {kind!r} is not supported (supported: {TEXT_TYPES})")
  if t["hidden_act"] != "silu":
    raise ValueError(f"text hidden_act {t['hidden_act']!r} is not supported (LLaMA/Qwen2 use silu)")
  if kind == "llama" and (t["attention_bias"] or t["mlp_bias"]):
    raise ValueError("a LLaMA with attention_bias / mlp_bias (biases on o_proj and the MLP too) is not supported")
  if kind == "qwen2" and t["use_sliding_window"]:
    raise ValueError("Qwen2 sliding-window attention is not supported")
  n = t["num_attention_heads"]
  theta, scaling = rope_scaling_from_hf(t)
  return LLMConfig(
      vocab_size=t["vocab_size"], width=t["hidden_size"], depth=t["num_hidden_layers"], num_heads=n,
      num_kv_heads=t["num_key_value_heads"] or n, head_dim=t["head_dim"] or t["hidden_size"] // n,
      mlp_dim=t["intermediate_size"], rope_theta=theta, rope_scaling=scaling, rms_norm_eps=t["rms_norm_eps"],
      qkv_bias=kind == "qwen2", tie_embeddings=bool(t["tie_word_embeddings"]))


def vision_config_from_hf(v: dict, feature_layer: int = -1) -> VisionConfig:
  """VisionConfig from a CLIPVisionModel / SiglipVisionModel config, a two-tower CLIPModel /
  SiglipModel config (its vision_config), or a LLaVA vision_config."""
  if v.get("model_type") in TWO_TOWER_TYPES:
    v = {"model_type": TWO_TOWER_TYPES[v["model_type"]], **(v.get("vision_config") or {})}
  v = with_defaults(v, "clip_vision_model")
  kind = v["model_type"]
  if kind not in VISION_TYPES:
    raise ValueError(f"vision model_type {kind!r} is not supported (supported: {VISION_TYPES})")
  siglip = kind == "siglip_vision_model"
  act = "gelu_pytorch_tanh" if siglip else "quick_gelu"
  if v["hidden_act"] != act:
    raise ValueError(f"{kind} with hidden_act {v['hidden_act']!r} is not supported (expected {act!r})")
  if v["num_channels"] != 3:
    raise ValueError(f"a tower with {v['num_channels']} input channels is not supported (RGB only)")
  for key in ("image_size", "patch_size"):
    if not isinstance(v[key], int):
      raise ValueError(f"non-square {key} {v[key]!r} is not supported")
  return VisionConfig(
      kind="siglip" if siglip else "clip", image_size=v["image_size"], patch_size=v["patch_size"],
      width=v["hidden_size"], depth=v["num_hidden_layers"], num_heads=v["num_attention_heads"],
      mlp_dim=v["intermediate_size"], layer_norm_eps=v["layer_norm_eps"], feature_layer=feature_layer,
      image_mean=SIGLIP_MEAN if siglip else CLIP_MEAN, image_std=SIGLIP_STD if siglip else CLIP_STD)


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
  """ModelConfig from a LLaVA `config.json` dict, complete or partial, in the mode its "ee_mllm"
  record names (stock LLaVA: self), the training mode recorded apart. `overrides`: mode flags
  switch the mode the weights run in (`ModelConfig.run_as`; attention="composite" on LLaVA
  weights is EE-MLLM-F), other fields are replaced."""
  model_type = hf.get("model_type", "llava")
  if model_type not in ("llava", "ee_mllm"):
    raise ValueError(f"model_type {model_type!r} is not a LLaVA (expected 'llava', or 'ee_mllm' for an export "
                     "that runs another mode)")
  hf = with_defaults({**hf, "model_type": "llava"}, "llava")
  vision_dict, text_dict = hf["vision_config"], hf["text_config"]  # LLaVA's defaults where absent or null
  siglip = vision_dict.get("model_type") == "siglip_vision_model"
  strategy = hf["vision_feature_select_strategy"]
  if strategy != ("full" if siglip else "default"):
    raise ValueError(f"vision_feature_select_strategy {strategy!r} with a {'SigLIP' if siglip else 'CLIP'} tower is "
                     "not supported (only 'default' = drop CLS for CLIP, 'full' for SigLIP)")
  layer = hf["vision_feature_layer"]
  if not isinstance(layer, int):
    raise ValueError(f"multi-layer vision features {layer} are not supported")
  if hf["projector_hidden_act"] != "gelu":
    raise ValueError(f"projector activation {hf['projector_hidden_act']!r} is not supported (LLaVA uses exact GELU)")
  if not hf["multimodal_projector_bias"]:
    raise ValueError("a projector without biases (multimodal_projector_bias=false) is not supported")
  llm = llm_config_from_hf(text_dict)
  if hf["tie_word_embeddings"] and not llm.tie_embeddings:
    llm = llm.replace(tie_embeddings=True)
  mode, trained = mode_lib.from_hf_record(hf, llm.depth)
  cfg = ModelConfig(vision=vision_config_from_hf(vision_dict, layer), llm=llm, projector="mlp2x_gelu", mode=mode,
                    trained_mode=None if trained == mode else trained)
  flags = {k: overrides.pop(k) for k in list(overrides) if k in mode_lib.FLAGS}
  if any(v is not None for v in flags.values()):
    cfg = cfg.run_as(**flags)
  return cfg.replace(**overrides) if overrides else cfg


# ----------------------------------------------------------------------------- export


def llm_config_to_hf(c: LLMConfig) -> dict:
  """A complete LlamaConfig / Qwen2Config dict (Qwen2 where q/k/v carry biases)."""
  kind = "qwen2" if c.qkv_bias else "llama"
  rope = {"rope_type": "default", "rope_theta": c.rope_theta}
  if c.rope_scaling is not None:
    s = c.rope_scaling
    rope.update(rope_type=s.kind, factor=s.factor)
    if s.kind == "llama3":
      rope.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                  original_max_position_embeddings=s.original_max_position_embeddings)
  d = {**HF_DEFAULTS[kind], "model_type": kind, "architectures": ["Qwen2ForCausalLM" if kind == "qwen2" else
                                                                  "LlamaForCausalLM"],
       "vocab_size": c.vocab_size, "hidden_size": c.width, "intermediate_size": c.mlp_dim,
       "num_hidden_layers": c.depth, "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
       "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps, "rope_parameters": rope,
       "tie_word_embeddings": c.tie_embeddings}
  d.pop("rope_theta")
  if c.rope_scaling is not None and c.rope_scaling.kind == "llama3":
    d["max_position_embeddings"] = max(d["max_position_embeddings"], int(
        c.rope_scaling.original_max_position_embeddings * c.rope_scaling.factor))
  return d


def vision_config_to_hf(c: VisionConfig) -> dict:
  kind = "siglip_vision_model" if c.kind == "siglip" else "clip_vision_model"
  return {**HF_DEFAULTS[kind], "model_type": kind, "hidden_size": c.width, "intermediate_size": c.mlp_dim,
          "num_hidden_layers": c.depth, "num_attention_heads": c.num_heads, "image_size": c.image_size,
          "patch_size": c.patch_size, "layer_norm_eps": c.layer_norm_eps}


def config_to_hf(cfg: ModelConfig, *, image_token_index: int, pad_token_id: int | None = None) -> dict:
  """A complete LlavaConfig dict for `cfg`, with our mode under the top-level "ee_mllm" key
  (`mode.to_hf_record`: what runs, and what the weights were trained in), and `model_type`
  "ee_mllm" unless stock LLaVA runs it as it is (`mode.hf_model_type`)."""
  if not cfg.mode.visual_in_decoder:
    raise ValueError(f"attention={cfg.attention!r} has no HF LLaVA equivalent; only self and composite models "
                     "export to the LLaVA layout")
  if cfg.projector != "mlp2x_gelu":
    raise ValueError(f"projector {cfg.projector!r} has no HF LLaVA equivalent (LLaVA's is mlp2x_gelu)")
  if not 0 <= image_token_index < cfg.llm.vocab_size:
    raise ValueError(f"image_token_index {image_token_index} is outside the vocabulary of {cfg.llm.vocab_size}")
  return {
      "architectures": ["LlavaForConditionalGeneration"],
      "model_type": mode_lib.hf_model_type(cfg.mode, cfg.weights_mode),
      "vision_config": vision_config_to_hf(cfg.vision), "text_config": llm_config_to_hf(cfg.llm),
      "image_token_index": image_token_index, "image_seq_length": cfg.tokens_per_image,
      "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
      "vision_feature_layer": cfg.vision.feature_layer,
      "vision_feature_select_strategy": "full" if cfg.vision.kind == "siglip" else "default",
      "tie_word_embeddings": cfg.llm.tie_embeddings, "pad_token_id": pad_token_id,
      "ee_mllm": mode_lib.to_hf_record(cfg.mode, cfg.weights_mode),
  }
