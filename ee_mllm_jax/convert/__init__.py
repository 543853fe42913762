"""Checkpoint interop: HF import (safetensors only). torch is never imported here."""

from ee_mllm_jax.convert.hf import config_from_hf, load_hf_llava, params_from_hf, read_safetensors

__all__ = ["config_from_hf", "load_hf_llava", "params_from_hf", "read_safetensors"]
