"""ee_mllm_jax: EE-MLLM (composite attention) and its baselines in JAX/Flax."""

from ee_mllm_jax import batch
from ee_mllm_jax.batch import Cache
from ee_mllm_jax.config import LLMConfig, ModelConfig, VisionConfig
from ee_mllm_jax.generate import generate
from ee_mllm_jax.models import EEMLLM

__all__ = ["Cache", "EEMLLM", "LLMConfig", "ModelConfig", "VisionConfig", "batch", "generate"]
