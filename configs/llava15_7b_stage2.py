"""LLaVA-1.5-7B recipe, stage 2 (visual instruction tuning): projector + LLM, tower frozen.

    python train.py --config configs/llava15_7b_stage2.py            # EE-MLLM (composite)
    python train.py --config configs/llava15_7b_stage2.py:self       # LLaVA-1.5 (self)

Defaults are LLaVA-1.5's published stage-2 hyperparameters (scripts/v1_5/finetune.sh):
llava_v1_5_mix665k, `vicuna_v1` template, global batch 128, lr 2e-5, 1 epoch, warmup ratio
0.03, cosine decay, no weight decay, bf16, gradient checkpointing, max length 2048. It
starts from the stage-1 checkpoint of the same mode (`init_from`, parameters only).
"""

import ml_collections

from configs import llava15_7b_stage1


def get_config(mode: str = "composite"):
  c = llava15_7b_stage1.get_config(mode)
  c.workdir = f"runs/llava15_7b_stage2_{mode}"
  c.data.train_file = "data/LLaVA-Instruct/llava_v1_5_mix665k.json"
  c.data.image_dir = "data/LLaVA-Instruct"
  c.data.template = "vicuna_v1"
  c.data.global_batch_size = 128
  c.data.truncate_turns = True
  c.data.image_in_place = False  # LLaVA: a single image's <image> goes first in its message
  c.optim.learning_rate = 2e-5
  c.optim.trainable = "projector/|llm/"
  c.init_from = ml_collections.ConfigDict(dict(path=f"runs/llava15_7b_stage1_{mode}/checkpoints", kind="orbax"))
  return c
