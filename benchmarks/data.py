"""Input pipeline throughput: samples/s at 0, 1 and 2 worker processes.

    python benchmarks/data.py [--batches 30 --batch-size 16]

Generates two synthetic datasets in a temporary directory -- the `demo` one (64 px, P=64)
and a benchmark-sized one (336 px "hard" images, CLIP-L/14 P=576) -- and times the
training iterator (decode PNG -> pad to square -> bicubic resize -> normalise, tokenise,
collate) after its first batch, so worker start-up is reported separately.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import grain

from ee_mllm_jax.config import ModelConfig
from ee_mllm_jax.data import make_train_iterator, synthetic

SETTINGS = {  # name -> (image size, difficulty, model preset)
    "demo 64px": (64, "easy", "demo"),
    "336px (P=576)": (336, "hard", "llava-1.5-7b"),
}


def measure(cfg, batches: int) -> tuple[float, float]:
  """(seconds to the first batch, samples/s over the next `batches`)."""
  start = time.perf_counter()
  it = make_train_iterator(cfg, shard=grain.sharding.NoSharding())
  next(it)
  first = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  rate = batches * cfg.global_batch_size / (time.perf_counter() - start)
  it.close()
  return first, rate


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batches", type=int, default=30)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--workers", default="0,1,2")
  args = parser.parse_args()
  print(f"{'dataset':<16}{'workers':>8}{'first batch s':>15}{'samples/s':>12}")
  with tempfile.TemporaryDirectory() as tmp:
    for name, (size, difficulty, preset) in SETTINGS.items():
      ds = synthetic.generate(f"{tmp}/{size}", num_train=(args.batches + 2) * args.batch_size, num_val=8,
                              image_size=size, difficulty=difficulty)
      for workers in map(int, args.workers.split(",")):
        cfg = ds.data_config(ModelConfig.preset(preset), global_batch_size=args.batch_size,
                             buckets=(64, 128, 256, 512), worker_count=workers)
        first, rate = measure(cfg, args.batches)
        print(f"{name:<16}{workers:>8}{first:>15.2f}{rate:>12.1f}", flush=True)


if __name__ == "__main__":
  main()
