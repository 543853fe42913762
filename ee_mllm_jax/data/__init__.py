"""Data: synthetic dataset, tokenizer + chat templates, image preprocessing, Grain pipeline.

    from ee_mllm_jax import data
    ds = data.ensure_dataset("data_cache/synthetic")           # generates once
    cfg = ds.data_config(model_cfg, global_batch_size=32, template="chatml")
    train = data.make_train_iterator(cfg)                       # dict batches, forever
    prompts = data.make_prompt_iterator(cfg)                    # (batch, meta) for eval
"""

from ee_mllm_jax.data.pipeline import (
    DataConfig,
    DataIterator,
    make_eval_iterator,
    make_iterator,
    make_prompt_iterator,
    make_train_iterator,
)
from ee_mllm_jax.data.records import BAD_RECORD_REASONS, BadRecordError, BadRecordStats, load_records
from ee_mllm_jax.data.text import ChatTemplate, load_tokenizer

_SYNTHETIC = ("SyntheticDataset", "answer_prior", "ensure_dataset", "generate")


def __getattr__(name):
  # Imported on first use, so `python -m ee_mllm_jax.data.synthetic` does not import it twice.
  if name in _SYNTHETIC:
    from ee_mllm_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    return getattr(synthetic, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
