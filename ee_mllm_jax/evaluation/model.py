"""The model an evaluation runs: a train.py checkpoint (its config, data settings and tokenizer
travel with it) or a local HF LLaVA directory (its exported mode, template and system prompt travel
in config.json), optionally run in another mode (`ModelConfig.run_as`: attention="composite" on a
self-trained model is EE-MLLM-F, the visual FFN kept unless visual_ffn=False)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import tokenizers

from ee_mllm_jax import mode as mode_lib
from ee_mllm_jax.config import ModelConfig
from ee_mllm_jax.data import text as text_lib


@dataclasses.dataclass
class EvalModel:
  cfg: ModelConfig  # what runs; cfg.weights_mode: what the weights were trained in
  params: Any
  tokenizer: tokenizers.Tokenizer
  template: text_lib.ChatTemplate
  image_preprocess: str = "pad"
  alpha_background: str = "white"
  buckets: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)
  source: str = ""

  @property
  def mode(self) -> str:
    """Which mode ran, in words, naming the training mode where it differs (`ModelConfig.mode_name`)."""
    return self.cfg.mode_name


def _overrides(mode: dict[str, Any], dtype: str | None) -> dict[str, Any]:
  unknown = sorted(set(mode) - set(mode_lib.FLAGS))
  if unknown:
    raise ValueError(f"unknown mode flag(s) {unknown}")
  return {**{k: v for k, v in mode.items() if v is not None}, **({"dtype": dtype} if dtype else {})}


def from_checkpoint(path: str, *, preset: str | None = None, template: str | None = None,
                    system_prompt: str | None = None, dtype: str | None = None, **mode) -> EvalModel:
  """A train.py checkpoint (run dir, its checkpoints/ dir, or one step), run in the mode the
  `mode` flags ask (None: as trained). `preset`, when given, must describe the checkpoint's
  architecture (a mismatch names the differing fields)."""
  from ee_mllm_jax import loading  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  run_config = loading.read_run_config(path)
  if run_config is None:
    raise ValueError(f"{loading.resolve_step_dir(path)} records no config; it was written before checkpoints "
                     "carried theirs")
  trained = ModelConfig.from_dict(run_config["model"])
  overrides = _overrides(mode, dtype)
  if preset:  # the user's expectation of the architecture, checked like a resumed run's
    loading.check_model_config(trained, ModelConfig.preset(preset).replace(
        mode=trained.mode, dtype=trained.dtype, param_dtype=trained.param_dtype),
        f"checkpoint {path} (vs --config.preset={preset})")
  cfg, params = loading.load_model(path, **overrides)
  loading.check_model_config(trained, cfg, f"checkpoint {path}")
  data = run_config.get("data") or {}
  tokenizer = loading.load_tokenizer(path)
  template = text_lib.ChatTemplate(template or data.get("template", "vicuna_v1"),
                                   system_prompt if system_prompt is not None else data.get("system_prompt"))
  return EvalModel(cfg, params, tokenizer, template, data.get("image_preprocess", "pad"),
                   data.get("alpha_background", "white"), tuple(data.get("buckets") or EvalModel.buckets),
                   source=loading.resolve_step_dir(path))


def from_hf(path: str, *, template: str | None = None, system_prompt: str | None = None, dtype: str | None = None,
            **mode) -> EvalModel:
  """A local HF LLaVA directory (config.json, *.safetensors, tokenizer.json), with the template and
  system prompt its export recorded (stock LLaVA: LLaVA-1.5's vicuna_v1) unless given."""
  from ee_mllm_jax.convert import hf  # pylint: disable=g-import-not-at-top
  for name in ("config.json", "tokenizer.json"):
    if not os.path.exists(os.path.join(path, name)):
      raise FileNotFoundError(f"--hf {path} has no {name}")
  record = hf.read_config(path).get("ee_mllm") or {}
  cfg, params = hf.load_hf_llava(path, **_overrides(mode, dtype))
  params = jax.device_put(params)
  template = text_lib.ChatTemplate(template or record.get("template") or "vicuna_v1",
                                   system_prompt if system_prompt is not None else record.get("system_prompt"))
  return EvalModel(cfg, params, text_lib.load_tokenizer(os.path.join(path, "tokenizer.json")), template,
                   source=os.path.abspath(path))
