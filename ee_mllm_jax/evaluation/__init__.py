"""Benchmark evaluation: readers for the published files, prompts, metrics, the batched runner.

    from ee_mllm_jax import evaluation as ev
    model = ev.model.from_checkpoint("runs/demo", attention="composite")      # or ev.model.from_hf(DIR)
    runner = ev.Runner(model, ev.EvalSettings(batch_size=32))
    summary = ev.evaluate(runner, "mmbench", ev.read("mmbench", "MMBench_DEV_EN.tsv"), "out/mmbench")
"""

from ee_mllm_jax.evaluation import metrics, model, prompts, readers
from ee_mllm_jax.evaluation.readers import BENCHMARKS, BenchmarkFormatError, Question, read
from ee_mllm_jax.evaluation.runner import EvalError, EvalSettings, Runner, evaluate, score, summary_table
