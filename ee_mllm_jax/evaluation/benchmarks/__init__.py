"""The benchmarks eval.py, the runner, the synthetic dataset and the experiments know: one object
each (`base.Benchmark`), one file each, listed here.

    from ee_mllm_jax.evaluation import benchmarks
    bench = benchmarks.get("textvqa")        # or an object, returned as it is
    benchmarks.names()                       # ("textvqa", "docvqa", "mmbench", "seedbench", "chartqa")

A new benchmark is a new file with a `base.Benchmark` subclass, and its line in `_ALL`.
"""

from __future__ import annotations

from ee_mllm_jax.evaluation.benchmarks.base import Benchmark, BenchmarkFormatError, Question
from ee_mllm_jax.evaluation.benchmarks.chartqa import ChartQA
from ee_mllm_jax.evaluation.benchmarks.docvqa import DocVQA
from ee_mllm_jax.evaluation.benchmarks.mmbench import MMBench
from ee_mllm_jax.evaluation.benchmarks.seedbench import SEEDBench
from ee_mllm_jax.evaluation.benchmarks.textvqa import TextVQA

_ALL: dict[str, Benchmark] = {b.name: b for b in (TextVQA(), DocVQA(), MMBench(), SEEDBench(), ChartQA())}


def get(benchmark: str | Benchmark) -> Benchmark:
  """The benchmark named `benchmark` (a Benchmark is returned as it is)."""
  if isinstance(benchmark, Benchmark):
    return benchmark
  if benchmark not in _ALL:
    raise ValueError(f"unknown benchmark {benchmark!r}; known: {list(_ALL)}")
  return _ALL[benchmark]


def names() -> tuple[str, ...]:
  return tuple(_ALL)


def synthetic() -> tuple[Benchmark, ...]:
  """The benchmarks the synthetic dataset writes a file for, in the order it writes them."""
  return tuple(b for b in _ALL.values() if b.synthetic_kind)


__all__ = ["Benchmark", "BenchmarkFormatError", "Question", "get", "names", "synthetic"]
