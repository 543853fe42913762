"""The demo model trained on every synthetic question type, for the benchmark files eval.py reads.

    python train.py --config configs/demo_bench.py                         # EE-MLLM (composite)
    python train.py --config configs/demo_bench.py:self                    # LLaVA (self attention)

configs/demo.py asks only colour / shape / count / position questions, so its val set writes
empty TextVQA / DocVQA / MMBench / SEED-Bench files. This config keeps the demo's model and
recipe and trains on the synthetic set's default mix, which adds the multiple-choice (MMBench,
SEED-Bench), word-reading (TextVQA) and form-field (DocVQA) questions, so that
`eval.py --benchmark ...` has questions of each kind.
"""

from configs import demo
from ee_mllm_jax.data.synthetic import DEFAULT_MIX


def get_config(mode: str = "composite"):
  if mode not in ("composite", "self"):
    raise ValueError(f"mode must be 'composite' or 'self', got {mode!r}")
  c = demo.get_config()
  c.workdir = f"runs/demo_bench_{mode}"
  c.model.attention = mode
  c.model.visual_ffn = mode == "self"
  c.synthetic.dir = "data_cache/synthetic_bench"
  c.synthetic.num_val = 800
  c.synthetic.mix = dict(DEFAULT_MIX)
  return c
