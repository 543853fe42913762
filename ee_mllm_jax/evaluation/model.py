"""The model an evaluation runs: a train.py checkpoint (its config, data settings and tokenizer
travel with it) or a local HF LLaVA directory, with the interaction mode optionally changed
(EE-MLLM-F: a `self`-trained model run with `attention="composite"`; `composite_from_layer=n`
keeps layers [0, n) self attention)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import tokenizers

from ee_mllm_jax.config import ModelConfig
from ee_mllm_jax.data import text as text_lib

MODE_NAMES = {("self", True): "self (LLaVA)", ("composite", False): "composite (EE-MLLM)",
              ("composite", True): "composite with visual FFN"}


@dataclasses.dataclass
class EvalModel:
  cfg: ModelConfig  # what runs
  trained: ModelConfig  # what the weights were trained as
  params: Any
  tokenizer: tokenizers.Tokenizer
  template: text_lib.ChatTemplate
  image_preprocess: str = "pad"
  alpha_background: str = "white"
  buckets: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)
  source: str = ""

  @property
  def mode(self) -> str:
    """Which mode ran, in words: EE-MLLM-F is composite attention on self-trained weights; a layer
    schedule names its self-attention layers."""
    name = MODE_NAMES.get((self.cfg.attention, self.cfg.runs_visual_ffn), self.cfg.attention)
    n = self.cfg.self_layers if self.cfg.attention == "composite" else 0
    if n:
      name = f"{name} from layer {n} ({'layer 0' if n == 1 else f'layers 0-{n - 1}'} self)"
    if self.trained.attention == "self" and self.cfg.attention == "composite":
      name = f"EE-MLLM-F: {name} on self-trained weights"
    return name


def _mode_overrides(attention: str | None, visual_ffn: bool | None, composite_from_layer: int | None) -> dict[str, Any]:
  mode = dict(attention=attention, visual_ffn=visual_ffn, composite_from_layer=composite_from_layer)
  return {k: v for k, v in mode.items() if v is not None}


def from_checkpoint(path: str, *, attention: str | None = None, visual_ffn: bool | None = None,
                    composite_from_layer: int | None = None, preset: str | None = None, template: str | None = None,
                    dtype: str | None = None) -> EvalModel:
  """A train.py checkpoint (run dir, its checkpoints/ dir, or one step). `preset`, when given,
  must describe the checkpoint's architecture (a mismatch names the differing fields)."""
  from ee_mllm_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  run_config = ckpt_lib.read_run_config(path)
  if run_config is None:
    raise ValueError(f"{ckpt_lib.resolve_step_dir(path)} records no config; it was written before checkpoints "
                     "carried theirs")
  trained = ModelConfig.from_dict(run_config["model"])
  overrides = _mode_overrides(attention, visual_ffn, composite_from_layer)
  if dtype:
    overrides["dtype"] = dtype
  if preset:  # the user's expectation of the architecture, checked like a resumed run's
    ckpt_lib.check_model_config(trained, ModelConfig.preset(preset, **{
        k: getattr(trained, k) for k in ckpt_lib.MODE_FIELDS + ("dtype", "param_dtype")}),
        f"checkpoint {path} (vs --config.preset={preset})")
  cfg, params = ckpt_lib.load_model(path, **overrides)
  ckpt_lib.check_model_config(trained, cfg, f"checkpoint {path}")
  data = run_config.get("data") or {}
  tokenizer = ckpt_lib.load_tokenizer(path)
  return EvalModel(cfg, trained, params, tokenizer,
                   text_lib.ChatTemplate(template or data.get("template", "vicuna_v1"), data.get("system_prompt")),
                   data.get("image_preprocess", "pad"), data.get("alpha_background", "white"),
                   tuple(data.get("buckets") or EvalModel.buckets), source=ckpt_lib.resolve_step_dir(path))


def from_hf(path: str, *, attention: str | None = None, visual_ffn: bool | None = None,
            composite_from_layer: int | None = None, template: str | None = None, system_prompt: str | None = None,
            dtype: str | None = None) -> EvalModel:
  """A local HF LLaVA directory (config.json, *.safetensors, tokenizer.json); LLaVA-1.5's
  vicuna_v1 template unless `template` says otherwise."""
  from ee_mllm_jax.convert import hf  # pylint: disable=g-import-not-at-top
  for name in ("config.json", "tokenizer.json"):
    if not os.path.exists(os.path.join(path, name)):
      raise FileNotFoundError(f"--hf {path} has no {name}")
  overrides = _mode_overrides(attention, visual_ffn, composite_from_layer)
  if dtype:
    overrides["dtype"] = dtype
  cfg, params = hf.load_hf_llava(path, **overrides)
  params = jax.device_put(params)
  trained = cfg.replace(attention="self", visual_ffn=True)
  return EvalModel(cfg, trained, params, text_lib.load_tokenizer(os.path.join(path, "tokenizer.json")),
                   text_lib.ChatTemplate(template or "vicuna_v1", system_prompt), source=os.path.abspath(path))
