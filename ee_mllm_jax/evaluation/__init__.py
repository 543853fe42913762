"""Benchmark evaluation: one object per benchmark (its reader, prompt, record, score and summary,
`benchmarks`), the prompts' chat encoding, shared metrics, the batched runner.

    from ee_mllm_jax import evaluation as ev
    model = ev.model.from_checkpoint("runs/demo", attention="composite")      # or ev.model.from_hf(DIR)
    runner = ev.Runner(model, ev.EvalSettings(batch_size=32))
    mmbench = ev.benchmarks.get("mmbench")
    questions = mmbench.expand(mmbench.read("MMBench_DEV_EN.tsv"))           # + circular rotations
    summary = ev.evaluate(runner, mmbench, questions, "out/mmbench")
"""

from ee_mllm_jax.evaluation import benchmarks, intervals, metrics, model, prompts
from ee_mllm_jax.evaluation.benchmarks import Benchmark, BenchmarkFormatError, Question
from ee_mllm_jax.evaluation.runner import EvalError, EvalSettings, Runner, evaluate, score, summary_table
