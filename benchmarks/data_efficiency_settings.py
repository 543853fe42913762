"""What benchmarks/data_efficiency.py compares, at which scale: the three modes and their stages,
the training mix, the benchmark columns, and the sizes of each scale (`--scale`). The procedure is
in data_efficiency.py; this file is what to edit to run a different study.
"""

from __future__ import annotations

import dataclasses

from ee_mllm_jax.mode import Composite, Cross, Self

# The three modes, as ModelConfig switches of one model. Flamingo: a gated cross-attention block
# before every second layer and a perceiver resampler (its ratio of latents to visual tokens, 1/4,
# is Flamingo-7B's 64 of 256).
MODES = {"llava": Self(), "ee-mllm": Composite(visual_ffn=False), "flamingo": Cross(every=2, resampler_depth=2)}
MODE_LABELS = {key: f"{m.paper} ({m.name})" for key, m in MODES.items()}  # "LLaVA (self)", ...
# Stage 1 trains the connector, stage 2 also the LLM (regexes over parameter paths, re.match).
STAGE1 = {"llava": r"projector/", "ee-mllm": r"projector/", "flamingo": r"(projector|resampler|llm/cross)/"}
STAGE2 = r"(projector|resampler|llm)/"
# The training mix: the four open types, and the benchmark types (MMBench / SEED / TextVQA / DocVQA),
# each an eighth. The multiple-choice ones are in LLaVA-1.5's layout (lettered options, "Answer with
# the option's letter from the given choices directly."), as in LLaVA's mix665k.
MIX = {"color": 1.0, "shape": 1.0, "count": 1.0, "position": 1.0, "choice_attribute": 1.0, "choice_spatial": 1.0,
       "text": 1.0, "doc": 1.0}
OPEN_TYPES = ("color", "shape", "count", "position")
# (name in tables, benchmark: its synthetic file, metric: a metrics.json key, None: the benchmark's
# headline; "open": the open questions as TextVQA). SEED ranks the options by their likelihood as
# the answer, SEED-Bench's own protocol for LLM-based models: choosing by the letter a model writes
# needs the letter skill, which a 4-layer LM does not reliably learn (see the report's setup).
BENCHMARKS = (("open", "textvqa", None), ("MMBench", "mmbench", None), ("SEED", "seedbench", "likelihood_accuracy"),
              ("TextVQA", "textvqa", None), ("DocVQA", "docvqa", None))
# Second readings shown beside the headline ones (never in a headline): per-row MMBench accuracy
# and SEED by the generated letter (lmms-eval's reading).
EXTRA_METRICS = (("MMBench rows", "MMBench", "row_accuracy"), ("SEED letter", "SEED", "accuracy"))


@dataclasses.dataclass(frozen=True)
class Scale:
  """Everything that sets the experiment's size."""

  sizes: tuple[int, ...]  # training-set sizes (nested prefixes of the experiment pool)
  pretrain: int  # pretraining-pool records
  val: int
  image_size: int
  patch_size: int
  vision: dict  # VisionConfig fields
  llm: dict  # LLMConfig fields (vocab_size: the tokenizer's)
  resampler_latents: int
  vocab: int  # synthetic tokenizer size
  batch: int
  buckets: tuple[int, ...]  # text-length buckets (each one more compile per run)
  stage1_epochs: float
  stage2_epochs: float
  stage1_lr: float
  stage2_lr: float
  pretrain_epochs: float
  pretrain_lr: float
  # The LLM's letter stage: steps on the letter exercises alone, after pretraining (0: none). Off
  # at the default and large scales: at the default shape 6,000 steps taught 53% of held-out
  # exercises, but seed 0's 8k LLaVA model on those parts (and the tower's word read-out) fell
  # from 58 to 36% on the open questions and still answered one letter (README, "Results").
  letter_steps: int
  tower_images: int
  tower_steps: int
  seeds: tuple[int, ...]  # every (mode, size) cell is trained once per seed
  eval_batch: int
  speed_width: int
  speed_layers: int
  speed_image_sizes: tuple[int, ...]
  speed_text: int
  # Processes that train and score the seeds' cells side by side (benchmarks/workers.py; at most one
  # per seed). At the default shape a step does not fill 2 cores: measured in README, "Results".
  workers: int = 1


SCALES = {
    "default": Scale(
        sizes=(500, 1000, 2000, 8000), pretrain=12000, val=1200, image_size=48, patch_size=6,
        vision=dict(width=96, depth=3, num_heads=3, mlp_dim=384),
        llm=dict(width=128, depth=4, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=352),
        resampler_latents=16, vocab=512, batch=32, buckets=(32, 64, 128),
        stage1_epochs=1.0, stage2_epochs=2.0, stage1_lr=2e-3, stage2_lr=1e-3, pretrain_epochs=2.0,
        pretrain_lr=2e-3, letter_steps=0, tower_images=12000, tower_steps=1500, seeds=(0, 1, 2), eval_batch=64,
        speed_width=512, speed_layers=4, speed_image_sizes=(336, 448, 672), speed_text=64, workers=3),
    # For a GPU (untested here: this project's machines lent none so far): a wider, deeper model at
    # 84 px (196 visual tokens) and 4x the data.
    "large": Scale(
        sizes=(2000, 4000, 8000, 32000), pretrain=48000, val=2400, image_size=84, patch_size=6,
        vision=dict(width=256, depth=6, num_heads=4, mlp_dim=1024),
        llm=dict(width=512, depth=8, num_heads=8, num_kv_heads=4, head_dim=64, mlp_dim=1408),
        resampler_latents=48, vocab=1024, batch=64, buckets=(32, 64, 128),
        stage1_epochs=1.0, stage2_epochs=2.0, stage1_lr=1e-3, stage2_lr=3e-4, pretrain_epochs=2.0,
        pretrain_lr=1e-3, letter_steps=0, tower_images=48000, tower_steps=6000, seeds=(0, 1, 2), eval_batch=128,
        speed_width=1024, speed_layers=8, speed_image_sizes=(336, 448, 672), speed_text=64),
    "tiny": Scale(
        sizes=(32, 64), pretrain=256, val=96, image_size=32, patch_size=8,
        vision=dict(width=32, depth=2, num_heads=2, mlp_dim=64),
        llm=dict(width=64, depth=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128),
        resampler_latents=4, vocab=384, batch=16, buckets=(96,),
        stage1_epochs=1.0, stage2_epochs=1.0, stage1_lr=2e-3, stage2_lr=1e-3, pretrain_epochs=1.0,
        pretrain_lr=2e-3, letter_steps=10, tower_images=256, tower_steps=30, seeds=(0, 1), eval_batch=32,
        speed_width=128, speed_layers=2, speed_image_sizes=(56, 84), speed_text=16),
}

# Fixed before any result was seen: the margin (points) within which two modes count as "about as
# good" (two one-sided tests), and the rule for an informative benchmark (its best model beats the
# answer prior by more than this many standard deviations across seeds).
MARGIN = 3.0
INFORMATIVE_SDS = 3.0
