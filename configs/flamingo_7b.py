"""Flamingo recipe (cross mode) on the LLaVA-1.5-7B parts: train only the new parameters.

    python train.py --config configs/flamingo_7b.py

The third corner of the paper's triangle, beside configs/llava15_7b_stage*.py: the CLIP ViT-L/336
tower and Vicuna-7B stay frozen; trained are the gated cross-attention blocks before the last layer
of every group of 4 decoder layers (layers 3, 7, ..., 31, as OpenFlamingo places them; `llm/cross/`,
tanh gates from 0, so training starts at the text-only LLM) and a perceiver resampler (64 latents,
6 layers) -- one regex, `optim.trainable`. Text attends to the immediately preceding image only
(Flamingo's masking).

The cross modules have OpenFlamingo's shape: 8 heads of 64 (`cross_heads`, `cross_head_dim`), exact
GELU in their FFNs, and the resampler runs on the tower's features at the tower's width 1024,
which are also the blocks' key/value inputs (`cross_media_width="vision"`): there is no projector.
That is 1.18B trainable parameters (1.116B in the 8 blocks, 63M in the resampler). With
`--config.model.cross_heads=0 --config.model.cross_head_dim=0 --config.model.cross_media_width=llm`
the modules take the LLM's heads (32 x 128) at the LLM's width after a trained projector: 2.84B.
Hyperparameters follow OpenFlamingo's training script (AdamW lr 1e-4, weight decay 0.1, linear
warmup, then constant); Flamingo trains these new parameters on far more data than
LLaVA's stage 1 uses, which is the data-efficiency argument of the paper.

It starts from the same pretrained parts as LLaVA's stage 1 (inherited `init_from.kind="hf_parts"`:
the CLIP tower and Vicuna, each from its own HF directory, and Vicuna's tokenizer.json); the cross
blocks and the resampler (and, at the LLM's width, the projector), which neither has, are initialised
(the run logs which).
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
  c.model.cross_ffn_activation = "gelu"  # exact (erf) GELU, OpenFlamingo's nn.GELU()
  c.model.cross_heads = 8  # OpenFlamingo's dim_head=64, heads=8
  c.model.cross_head_dim = 64
  c.model.cross_media_width = "vision"  # resampler and block keys/values on the tower's features; no projector
  c.model.resampler_latents = 64
  c.model.resampler_depth = 6
  c.optim.learning_rate = 1e-4
  c.optim.weight_decay = 0.1
  c.optim.warmup_ratio = 0.03
  c.optim.end_lr_ratio = 1.0  # constant after warmup
  c.optim.trainable = TRAINABLE
  return c
