"""The one HF <-> ours name map, read forwards by import and backwards by export.

Each entry is our flat parameter path -> (HF tensor name, hook); `{i}` in the name marks a
layer of a scanned stack (our leaf has a leading (L,) axis, HF has one tensor per layer). A
hook is a pair of functions on one layer's tensor, `to_ours` and its inverse `to_hf`:
transpose a torch Linear, split/merge heads, reorder a conv kernel. They use array methods
only, so they run on numpy arrays, jax arrays and (for shapes) under `jax.eval_shape`.

Names are relative to a component's root, and a layout says where each root sits:

    component   ours       HF roots (LLaVA whole / standalone checkpoint)
    vision      vision/    vision_tower.          / "" (CLIPVisionModel, SiglipVisionModel)
                                                  / vision_model. (CLIPModel, SiglipModel, older
                                                    standalone towers)
    llm         llm/       language_model.        / "" (LlamaForCausalLM, Qwen2ForCausalLM)
    projector   projector/ multi_modal_projector. / -
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from ee_mllm_jax.config import LLMConfig, ModelConfig, VisionConfig


class Hook(NamedTuple):
  to_ours: Callable
  to_hf: Callable


SAME = Hook(lambda w: w, lambda w: w)
LINEAR = Hook(lambda w: w.T, lambda k: k.T)  # torch Linear (out, in) <-> kernel (in, out)
# conv (out, in, kh, kw) <-> (kh, kw, in, out)
CONV = Hook(lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1))


def heads_in(n: int, h: int) -> Hook:
  """q/k/v: weight (n*h, d) <-> kernel (d, n, h); bias (n*h,) <-> (n, h)."""
  return Hook(lambda w: w.T.reshape(-1, n, h) if w.ndim == 2 else w.reshape(n, h),
              lambda k: k.reshape(k.shape[0], n * h).T if k.ndim == 3 else k.reshape(n * h))


def heads_out(n: int, h: int) -> Hook:
  """o_proj / out_proj: weight (d, n*h) <-> kernel (n, h, d)."""
  return Hook(lambda w: w.T.reshape(n, h, -1), lambda k: k.reshape(n * h, k.shape[-1]).T)


NameMap = dict[str, tuple[str, Hook]]


def vision_map(c: VisionConfig) -> NameMap:
  """Our path under vision/ -> (HF name under the tower root, hook)."""
  n, h = c.num_heads, c.head_dim
  m = {
      "patch_embedding": ("embeddings.patch_embedding.weight", CONV),
      "position_embedding": ("embeddings.position_embedding.weight", SAME),
      "post_layernorm/scale": ("post_layernorm.weight", SAME),
      "post_layernorm/bias": ("post_layernorm.bias", SAME),
  }
  if c.class_token:
    m["class_embedding"] = ("embeddings.class_embedding", SAME)
    m["pre_layrnorm/scale"] = ("pre_layrnorm.weight", SAME)
    m["pre_layrnorm/bias"] = ("pre_layrnorm.bias", SAME)
  else:
    m["patch_bias"] = ("embeddings.patch_embedding.bias", SAME)
  layer = "encoder.layers.{i}."
  for ln in ("layer_norm1", "layer_norm2"):
    m[f"layers/{ln}/scale"] = (layer + f"{ln}.weight", SAME)
    m[f"layers/{ln}/bias"] = (layer + f"{ln}.bias", SAME)
  for p in ("q_proj", "k_proj", "v_proj"):
    for leaf, suffix in (("kernel", "weight"), ("bias", "bias")):
      m[f"layers/{p}/{leaf}"] = (layer + f"self_attn.{p}.{suffix}", heads_in(n, h))
  m["layers/out_proj/kernel"] = (layer + "self_attn.out_proj.weight", heads_out(n, h))
  m["layers/out_proj/bias"] = (layer + "self_attn.out_proj.bias", SAME)
  for fc in ("fc1", "fc2"):
    m[f"layers/{fc}/kernel"] = (layer + f"mlp.{fc}.weight", LINEAR)
    m[f"layers/{fc}/bias"] = (layer + f"mlp.{fc}.bias", SAME)
  return m


def llm_map(c: LLMConfig) -> NameMap:
  """Our path under llm/ -> (HF name under the causal-LM root, hook)."""
  layer = "model.layers.{i}."
  attn = layer + "self_attn."
  m = {
      "embed_tokens/embedding": ("model.embed_tokens.weight", SAME),
      "norm/scale": ("model.norm.weight", SAME),
      "layers/input_layernorm/scale": (layer + "input_layernorm.weight", SAME),
      "layers/post_attention_layernorm/scale": (layer + "post_attention_layernorm.weight", SAME),
      "layers/self_attn/q_proj/kernel": (attn + "q_proj.weight", heads_in(c.num_heads, c.head_dim)),
      "layers/self_attn/k_proj/kernel": (attn + "k_proj.weight", heads_in(c.num_kv_heads, c.head_dim)),
      "layers/self_attn/v_proj/kernel": (attn + "v_proj.weight", heads_in(c.num_kv_heads, c.head_dim)),
      "layers/self_attn/o_proj/kernel": (attn + "o_proj.weight", heads_out(c.num_heads, c.head_dim)),
  }
  if c.qkv_bias:
    for p, n in (("q_proj", c.num_heads), ("k_proj", c.num_kv_heads), ("v_proj", c.num_kv_heads)):
      m[f"layers/self_attn/{p}/bias"] = (attn + f"{p}.bias", heads_in(n, c.head_dim))
  for p in ("gate_proj", "up_proj", "down_proj"):
    m[f"layers/mlp/{p}/kernel"] = (layer + f"mlp.{p}.weight", LINEAR)
  if not c.tie_embeddings:
    m["lm_head/kernel"] = ("lm_head.weight", LINEAR)
  return m


def projector_map(cfg: ModelConfig) -> NameMap:
  m = {}
  for n in ("linear_1", "linear_2") if cfg.projector == "mlp2x_gelu" else ("linear_1",):
    m[f"{n}/kernel"] = (f"{n}.weight", LINEAR)
    m[f"{n}/bias"] = (f"{n}.bias", SAME)
  return m


# Where each component's root sits in a whole LLaVA checkpoint, as transformers 5 writes it.
LLAVA_ROOTS = {"vision": "vision_tower.", "projector": "multi_modal_projector.", "llm": "language_model."}
# Prefixes other transformers versions write for the same tensors (-> the canonical one).
LLAVA_ALIASES = {
    "vision_tower.vision_model.": "vision_tower.", "model.vision_tower.vision_model.": "vision_tower.",
    "model.vision_tower.": "vision_tower.", "model.language_model.": "language_model.model.",
    "lm_head.": "language_model.lm_head.", "model.multi_modal_projector.": "multi_modal_projector.",
}
# Standalone towers: transformers 5 writes CLIPVisionModel / SiglipVisionModel at the root,
# older versions (and the two-tower CLIPModel / SiglipModel) under vision_model.
TOWER_ALIASES = {"vision_model.": ""}


def component_map(cfg: ModelConfig, component: str) -> NameMap:
  return {"vision": lambda: vision_map(cfg.vision), "llm": lambda: llm_map(cfg.llm),
          "projector": lambda: projector_map(cfg)}[component]()


def name_map(cfg: ModelConfig, components=("vision", "projector", "llm"), roots=None) -> NameMap:
  """Our full flat path ("llm/layers/...") -> (HF name in the checkpoint, hook). `roots`:
  {component: prefix}, by default a whole LLaVA checkpoint's."""
  roots = LLAVA_ROOTS if roots is None else roots
  out = {}
  for comp in components:
    if comp == "projector" and not cfg.has_projector:  # cross mode with media at the vision width
      continue
    out.update({f"{comp}/{k}": (roots[comp] + name, hook) for k, (name, hook) in component_map(cfg, comp).items()})
  return out


def canonical_name(name: str, aliases: dict[str, str]) -> str:
  for alias in sorted(aliases, key=len, reverse=True):  # the longest matching prefix wins
    if name.startswith(alias):
      return aliases[alias] + name[len(alias):]
  return name
