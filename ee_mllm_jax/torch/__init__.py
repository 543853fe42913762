"""EE-MLLM's composite attention in PyTorch, on transformers' own LLaVA / LLaMA / Qwen2 modules.

`EEMLLMForConditionalGeneration` is a `transformers.LlavaForConditionalGeneration` (same
checkpoint keys, same `generate()`) whose decoder, in composite mode, computes queries and
attention scores for text tokens only and updates visual tokens with the aligner. It loads a
stock LLaVA directory or one exported by `ee_mllm_jax.convert` (whose `config.json` records
`"ee_mllm": {"attention": ..., "visual_ffn": ..., "composite_from_layer": ..., "trained": {...}}` and,
unless it is a plain self-trained LLaVA, `model_type` "ee_mllm", registered here with the Auto
classes), with no custom code in the directory:

    from ee_mllm_jax.torch import EEMLLMForConditionalGeneration
    model = EEMLLMForConditionalGeneration.from_pretrained(DIR)                          # its recorded mode
    model = EEMLLMForConditionalGeneration.from_pretrained(DIR, attention="composite")   # EE-MLLM-F
    model.set_mode(composite_from_layer=2)                # layers 0-1 self attention, the rest composite
    model.set_mode(fastv_layer=2, fastv_ratio=0.5)        # FastV (self or composite), kept by save_pretrained
    out = model.generate(**processor(images=image, text=prompt, return_tensors="pt"), max_new_tokens=32)

The token reductions (FastV, VisionZip: `torch/reduction.py`) run as the JAX model runs them, from
the export's record or the same keywords (`fastv_layer`, `fastv_ratio`, `visionzip_dominant`,
`visionzip_contextual`).

This subpackage imports torch and transformers (an optional extra); `import ee_mllm_jax` never does.
"""

try:
  import torch  # noqa: F401
  import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
  raise ImportError("ee_mllm_jax.torch needs PyTorch and transformers: install the CPU wheel first "
                    "(`pip install torch==2.13.0`), then `pip install -e '.[torch]'`") from e

from ee_mllm_jax.torch.composite import composite_decoder
from ee_mllm_jax.torch.llava import EEMLLMConfig, EEMLLMForConditionalGeneration, EEMLLMModel, mode_of, modes_of

__all__ = ["EEMLLMConfig", "EEMLLMForConditionalGeneration", "EEMLLMModel", "composite_decoder", "mode_of", "modes_of"]
