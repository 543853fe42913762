"""LLaVA-1.5-7B recipe, stage 1 (feature alignment): train the projector only.

    python train.py --config configs/llava15_7b_stage1.py            # EE-MLLM (composite)
    python train.py --config configs/llava15_7b_stage1.py:self       # LLaVA-1.5 (self)

The argument after ':' picks the mode: `composite` (EE-MLLM: visual tokens skip the FFN)
or `self` (LLaVA). Defaults are LLaVA-1.5's published stage-1 hyperparameters
(scripts/v1_5/pretrain.sh): LCS-558K captions, `plain` template, global batch 256,
lr 1e-3, 1 epoch, warmup ratio 0.03, cosine decay, no weight decay, bf16, gradient
checkpointing, max length 2048.
Starts as LLaVA-1.5's stage 1 does: the CLIP ViT-L/14-336 tower and Vicuna-7B-v1.5, each
from its own HF directory (`init_from.kind="hf_parts"`: openai/clip-vit-large-patch14-336,
a CLIPModel whose text half is left out, and lmsys/vicuna-7b-v1.5), a freshly initialised
projector, and Vicuna's own tokenizer.json (data.tokenizer_file left empty). Point `data.*`
at the data and `init_from.vision_path` / `init_from.llm_path` at the two downloads
(safetensors; convert *.bin once with `save_pretrained(..., safe_serialization=True)`).
"""

import ml_collections

from configs import demo


def get_config(mode: str = "composite"):
  if mode not in ("composite", "self"):
    raise ValueError(f"mode must be 'composite' or 'self', got {mode!r}")
  c = demo.get_config()
  c.workdir = f"runs/llava15_7b_stage1_{mode}"
  c.model.preset = "llava-1.5-7b"
  c.model.attention = mode
  c.model.visual_ffn = mode == "self"
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  # Frozen layers still keep activations: the projector's gradient flows back through every LLM
  # layer (LLaVA's stage 1 uses gradient checkpointing too). benchmarks/memory.py: remat none
  # vs full for one step of 32 rows.
  c.model.remat = "full"
  c.synthetic.dir = ""  # real data
  c.data = ml_collections.ConfigDict(dict(
      train_file="data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json",
      val_file="",
      image_dir="data/LLaVA-Pretrain/images",
      tokenizer_file="",  # the LLM directory's tokenizer.json
      template="plain", system_prompt=None, global_batch_size=256,
      buckets=(64, 128, 256, 512, 1024, 2048), truncate_turns=False, max_images=1,
      image_preprocess="pad", on_bad_record="skip", worker_count=8, read_threads=4,
      prefetch_batches=4, seed=0))
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.steps = -1  # num_epochs over the train set
  c.num_epochs = 1.0
  c.accum_steps = 1  # raise it (same global batch) when 256 rows do not fit
  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=1e-3, warmup_ratio=0.03, end_lr_ratio=0.0, weight_decay=0.0,
      b1=0.9, b2=0.999, eps=1e-8, clip_norm=1.0, trainable="projector/"))
  c.checkpoint = ml_collections.ConfigDict(dict(dir="", every_steps=500, keep=2, async_save=True))
  c.init_from = ml_collections.ConfigDict(dict(
      kind="hf_parts", path="", vision_path="checkpoints/clip-vit-large-patch14-336",
      llm_path="checkpoints/vicuna-7b-v1.5"))
  c.log_every = 10
  c.eval_every = -1
  c.eval_batch_size = 64
  c.eval_blank_images = False
  return c
