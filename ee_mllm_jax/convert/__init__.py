"""Checkpoint interop with Hugging Face: import (a whole LLaVA, an LLM, a tower, or a pair
assembled with a fresh projector) and export to a stock LLaVA directory. Safetensors only;
torch and transformers are never imported here."""

from ee_mllm_jax.convert.hf import assemble, load_hf_llava, load_hf_llm, load_hf_vision, params_from_hf
from ee_mllm_jax.convert.hf_config import config_from_hf, config_to_hf, llm_config_from_hf, vision_config_from_hf
from ee_mllm_jax.convert.safetensors_io import PickleCheckpointError, TensorReader, read_safetensors

__all__ = ["assemble", "config_from_hf", "config_to_hf", "llm_config_from_hf", "load_hf_llava", "load_hf_llm",
           "load_hf_vision", "params_from_hf", "PickleCheckpointError", "read_safetensors", "TensorReader",
           "vision_config_from_hf"]
