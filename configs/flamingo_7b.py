"""Flamingo recipe (cross mode) on the LLaVA-1.5-7B parts: train only the new parameters.

    python train.py --config configs/flamingo_7b.py

The third corner of the paper's triangle, beside configs/llava15_7b_stage*.py: the CLIP ViT-L/336
tower and Vicuna-7B stay frozen; trained are the gated cross-attention blocks before every 4th
decoder layer (`llm/cross/`, tanh gates from 0, so training starts at the text-only LLM), a
perceiver resampler (64 latents, 6 layers, as OpenFlamingo) and the projector -- one regex,
`optim.trainable`. Text attends to the immediately preceding image only (Flamingo's masking).
Hyperparameters follow OpenFlamingo's training script (AdamW lr 1e-4, weight decay 0.1, linear
warmup, then constant); Flamingo trains these ~3B new parameters on far more data than
LLaVA's stage 1 uses, which is the data-efficiency argument of the paper.

It starts from the same pretrained parts as LLaVA's stage 1 (inherited `init_from.kind="hf_parts"`:
the CLIP tower and Vicuna, each from its own HF directory, and Vicuna's tokenizer.json); the cross
blocks, the resampler and the projector, which neither has, are initialised (the run logs which).
`init_from` may instead name an Orbax checkpoint of a self/composite run (kind="orbax") or an HF
LLaVA directory (kind="hf").
"""

from configs import llava15_7b_stage1

# The parameters the recipe trains (re.match against "/"-joined parameter paths).
TRAINABLE = r"(llm/cross|resampler|projector)/"


def get_config():
  c = llava15_7b_stage1.get_config("self")
  c.workdir = "runs/flamingo_7b"
  c.model.attention = "cross"
  c.model.visual_ffn = False
  c.model.cross_every = 4
  c.model.cross_media = "previous"
  c.model.cross_ffn_mult = 4
  c.model.resampler_latents = 64
  c.model.resampler_depth = 6
  c.optim.learning_rate = 1e-4
  c.optim.weight_decay = 0.1
  c.optim.warmup_ratio = 0.03
  c.optim.end_lr_ratio = 1.0  # constant after warmup
  c.optim.trainable = TRAINABLE
  return c
