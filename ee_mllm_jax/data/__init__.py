"""Data: synthetic dataset, tokenizer + chat templates, image preprocessing, Grain pipeline.

    from ee_mllm_jax import data
    ds = data.ensure_dataset("data_cache/synthetic")           # generates once
    cfg = ds.data_config(model_cfg, global_batch_size=32, template="chatml")
    train = data.make_train_iterator(cfg)                       # dict batches, forever
    prompts = data.make_prompt_iterator(cfg)                    # (batch, meta) for eval
"""

from ee_mllm_jax.data.records import BAD_RECORD_REASONS, BadRecordError, BadRecordStats, load_records
from ee_mllm_jax.data.text import ChatTemplate, load_tokenizer

# Imported on first use: the pipeline so that loading a model for inference (eval.py, which reads
# images and text through this package) does not import Grain; synthetic so that
# `python -m ee_mllm_jax.data.synthetic` does not import it twice.
_LAZY = {"pipeline": ("pipeline", None), "synthetic": ("synthetic", None),
         **{name: ("pipeline", name) for name in ("DataConfig", "DataIterator", "make_eval_iterator", "make_iterator",
                                                  "make_prompt_iterator", "make_train_iterator")},
         **{name: ("synthetic", name) for name in ("SyntheticDataset", "answer_prior", "ensure_dataset", "generate")}}


def __getattr__(name):
  if name in _LAZY:
    import importlib  # pylint: disable=g-import-not-at-top
    module, attr = _LAZY[name]
    module = importlib.import_module(f"{__name__}.{module}")
    return module if attr is None else getattr(module, attr)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
