"""Several seeds of benchmarks/data_efficiency.py at once, in worker processes.

The cells of a seed (its alignment runs and their scores) depend on nothing of another seed but
the shared data and pretrained parts, and each step caches itself under the work directory. So the
parent makes the shared parts, starts one worker per group of seeds (`--cells_only`: the same
command, restricted to its seeds, that trains and scores its cells and stops), waits, and then runs
its own procedure, which finds every cell cached. A worker that fails stops the run with its log's
tail; a rerun resumes every worker where it stopped.

On small models a step does not fill the CPU's cores (its ops are too small to split well), so
processes side by side get more done per minute than one; `jax.vmap` over seeds did not
(benchmarks/data_efficiency_settings.py, `Scale.workers`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

# Flags that only the parent acts on (each takes a value), and --note (a remark, not a setting).
PARENT_ONLY = ("--seeds", "--workers", "--out", "--note")


def shown_args(argv: list[str]) -> list[str]:
  """The command's arguments without --note (a remark about this run, not a setting)."""
  return _without(argv, ("--note",))


def _without(argv: list[str], flags: tuple[str, ...]) -> list[str]:
  out, skip = [], False
  for a in argv:
    if skip:
      skip = False
    elif a in flags:
      skip = True
    elif not any(a.startswith(f + "=") for f in flags):
      out.append(a)
  return out


def seed_groups(seeds: tuple[int, ...], workers: int) -> list[tuple[int, ...]]:
  """`seeds` dealt round-robin into at most `workers` non-empty groups."""
  workers = max(1, min(workers, len(seeds)))
  return [tuple(seeds[i::workers]) for i in range(workers)]


def run_cells(script: str, argv: list[str], seeds: tuple[int, ...], workers: int, work: str) -> float:
  """Trains and scores every cell of `seeds` in `workers` processes (nothing when one would do
  it all: the caller's own loop does); -> the wall seconds it took."""
  groups = seed_groups(seeds, workers)
  if len(groups) < 2:
    return 0.0
  os.makedirs(os.path.join(work, "logs"), exist_ok=True)
  base = [sys.executable, script] + _without(argv, PARENT_ONLY) + ["--cells_only", "--out", os.path.join(work, "logs")]
  t0, procs = time.perf_counter(), []
  for group in groups:
    log = os.path.join(work, "logs", f"seeds_{'_'.join(map(str, group))}.log")
    with open(log, "w") as f:
      procs.append((group, log, subprocess.Popen(base + ["--seeds", ",".join(map(str, group))], stdout=f,
                                                 stderr=subprocess.STDOUT)))
    print(f"worker for seeds {group}: log {log}", flush=True)
  failed = []
  for group, log, proc in procs:
    if proc.wait() != 0:
      failed.append((group, log, proc.returncode))
  if failed:
    tails = []
    for group, log, rc in failed:
      with open(log) as f:
        tails.append(f"--- seeds {group} (exit {rc}), {log}:\n" + "".join(f.readlines()[-30:]))
    raise SystemExit("worker(s) failed; a rerun resumes them:\n" + "\n".join(tails))
  return time.perf_counter() - t0
