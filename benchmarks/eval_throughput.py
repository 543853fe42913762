"""Evaluation questions/s with and without image-prefix reuse, self vs composite, in one process.

    python benchmarks/eval_throughput.py --checkpoint runs/demo_bench_composite \
        --synthetic data_cache/synthetic_bench [--questions 64 --batch-size 16]

The same weights run in self and in composite mode (one of them is not how they were trained:
speed does not care). MMBench is evaluated with its circular rotations (4 questions per image)
and SEED-Bench with option likelihoods (4 scored rows per question), where reuse runs the
vision tower and the image prefill once per image instead of once per row. Each setting runs
the questions once to compile, then once timed; prints questions/s and the reuse speedup.
"""

from __future__ import annotations

import argparse
import time

from ee_mllm_jax.data import synthetic
from ee_mllm_jax.evaluation import benchmarks, runner as runner_lib
from ee_mllm_jax.evaluation import model as model_lib


def questions_per_second(model, benchmark, questions, reuse: bool, batch_size: int) -> float:
  settings = runner_lib.EvalSettings(batch_size=batch_size, max_new_tokens=4, reuse_prefix=reuse, progress_bar=False)
  runner = runner_lib.Runner(model, settings)
  items = runner.items(benchmark, questions)
  runner.predict(benchmark, items, lambda records: None)  # compile
  t0 = time.perf_counter()
  runner.predict(benchmark, items, lambda records: None)
  return len(items) / (time.perf_counter() - t0)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--synthetic", required=True, help="a synthetic dataset directory (its benchmarks/ files)")
  p.add_argument("--benchmarks", nargs="+", default=["mmbench", "seedbench"],
                 choices=[b.name for b in benchmarks.synthetic()])
  p.add_argument("--questions", type=int, default=64, help="questions per benchmark (after MMBench rotations)")
  p.add_argument("--batch-size", type=int, default=16)
  args = p.parse_args()
  rows = []
  for benchmark in args.benchmarks:
    bench = benchmarks.get(benchmark)
    qs = bench.expand(bench.read(synthetic.SyntheticDataset(args.synthetic).benchmarks[benchmark], args.synthetic))
    qs = qs[:args.questions]
    for mode in ("self", "composite"):
      model = model_lib.from_checkpoint(args.checkpoint, attention=mode, visual_ffn=mode == "self" or None)
      speed = {reuse: questions_per_second(model, benchmark, qs, reuse, args.batch_size) for reuse in (False, True)}
      rows.append((benchmark, mode, len(qs), speed[False], speed[True]))
      print(f"{benchmark:<10} {mode:<10} {len(qs):4d} questions  no reuse {speed[False]:7.2f} q/s  reuse "
            f"{speed[True]:7.2f} q/s  speedup {speed[True] / speed[False]:.2f}x", flush=True)
  print("\n| benchmark | mode | questions | q/s, no reuse | q/s, prefix reuse | reuse speedup |")
  print("|---|---|---|---|---|---|")
  for b, m, n, a, r in rows:
    print(f"| {b} | {m} | {n} | {a:.2f} | {r:.2f} | {r / a:.2f}x |")
  by = {(b, m): r for b, m, _, _, r in rows}
  for b in args.benchmarks:
    print(f"{b}: composite / self questions/s with reuse: {by[(b, 'composite')] / by[(b, 'self')]:.2f}x")


if __name__ == "__main__":
  main()
