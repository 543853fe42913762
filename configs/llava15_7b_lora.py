"""LLaVA-1.5-7B recipe, stage 2 with LoRA: adapters on every decoder projection, the projector at
full rank with its own learning rate, the tower and the base LLM frozen (held in bf16).

    python train.py --config configs/llava15_7b_lora.py            # EE-MLLM (composite)
    python train.py --config configs/llava15_7b_lora.py:self       # LLaVA-1.5 (self)

LLaVA-1.5's published LoRA hyperparameters (scripts/v1_5/finetune_lora.sh and the training
arguments' defaults): LoRA rank 128, alpha 256, dropout 0.05 on every linear layer of the LLM but
lm_head; learning rate 2e-4, projector learning rate 2e-5; global batch 128 (16 per GPU on 8);
otherwise stage 2's (1 epoch, warmup ratio 0.03, cosine, no weight decay, bf16, gradient
checkpointing, 2048 tokens). In composite mode the aligner reuses each layer's adapted
v_proj / o_proj. `python eval.py` reads the adapters as trained; `export.py` merges them into a
stock HF directory (or writes a PEFT adapter directory beside it).
"""

from configs import llava15_7b_stage2
from ee_mllm_jax import lora


def get_config(mode: str = "composite"):
  c = llava15_7b_stage2.get_config(mode)
  c.workdir = f"runs/llava15_7b_lora_{mode}"
  c.model.llm.lora.update(rank=128, alpha=256.0, dropout=0.05, targets=r"llm/(layers|cross)/")
  c.optim.learning_rate = 2e-4
  c.optim.group_learning_rates = (("projector/", 2e-5),)
  c.optim.trainable = lora.TRAINABLE
  return c
