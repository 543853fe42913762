from ee_mllm_jax.models.mllm import EEMLLM

__all__ = ["EEMLLM"]
