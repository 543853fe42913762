"""LoRA adapters as a PEFT adapter directory, for the base model export writes beside it.

    adapter_config.json          peft_type LORA, r, lora_alpha, lora_dropout, target_modules
    adapter_model.safetensors    base_model.model.<HF module>.lora_A.weight (r, in)
                                 base_model.model.<HF module>.lora_B.weight (out, r)

`target_modules` lists the adapted modules by their full HF names (one per layer), so PEFT adapts
exactly those (a bare "q_proj" would also match the vision tower's). The HF module of an adapted
projection is its kernel's HF tensor (`convert/names.py`) under transformers 5's module path; the input and
output axes flatten as the kernel's do (heads-major), so `W + (alpha/r) B A` in PyTorch is our merge.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from ee_mllm_jax.config import ModelConfig
from ee_mllm_jax.convert import names, safetensors_io

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Checkpoint prefixes (as transformers 5 writes a LLaVA) -> its module paths, which PEFT names.
MODULE_PREFIXES = {"language_model.model.": "model.language_model.", "language_model.lm_head.": "lm_head.",
                   "vision_tower.": "model.vision_tower.", "multi_modal_projector.": "model.multi_modal_projector."}


def module_name(tensor: str) -> str:
  """A weight's checkpoint name -> the module that holds it in LlavaForConditionalGeneration."""
  for prefix, module in MODULE_PREFIXES.items():
    if tensor.startswith(prefix):
      return module + tensor[len(prefix):-len(".weight")]
  raise ValueError(f"{tensor}: no LLaVA module prefix ({sorted(MODULE_PREFIXES)})")


def write_adapter(cfg: ModelConfig, params: Mapping[str, Any], out_dir: str, *, base_model: str = "",
                  dtype=None) -> str:
  """Writes `out_dir` (created; must not hold an adapter) from the adapters in `params`; returns it."""
  from ee_mllm_jax import lora  # pylint: disable=g-import-not-at-top

  spec = cfg.llm.lora
  if spec is None:
    raise ValueError("the model has no LoRA adapters (cfg.llm.lora is None)")
  table = names.name_map(cfg)
  tensors, modules = [], []
  for path, (a, b) in sorted(lora.adapters(params).items()):
    hf_name, _ = table[path + "/kernel"]
    if not hf_name.endswith(".weight"):
      raise ValueError(f"{path}: its HF tensor {hf_name} is not a module's weight")
    a, b = np.asarray(a), np.asarray(b)
    layers = range(a.shape[0]) if "{i}" in hf_name else [None]
    for i in layers:
      a_i, b_i = (a[i], b[i]) if i is not None else (a, b)
      module = module_name(hf_name.format(i=i))
      modules.append(module)
      r = a_i.shape[-1]
      for suffix, value in (("lora_A", a_i.reshape(-1, r).T), ("lora_B", b_i.reshape(r, -1).T)):
        value = value.astype(dtype or value.dtype)
        tensors.append((f"base_model.model.{module}.{suffix}.weight", value.shape, value.dtype,
                        lambda value=value: value))
  os.makedirs(out_dir, exist_ok=True)
  if os.path.exists(os.path.join(out_dir, ADAPTER_WEIGHTS)):
    raise FileExistsError(f"{out_dir} already holds an adapter")
  safetensors_io.write_file(os.path.join(out_dir, ADAPTER_WEIGHTS), tensors)
  config = dict(peft_type="LORA", task_type=None, base_model_name_or_path=base_model, r=spec.rank,
                lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=modules, bias="none",
                fan_in_fan_out=False, use_rslora=False, init_lora_weights=True, modules_to_save=None,
                inference_mode=True)
  with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
    json.dump(config, f, indent=2)
  return out_dir
