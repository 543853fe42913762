"""Train EE-MLLM (or its LLaVA baseline): flags -> config -> `ee_mllm_jax.train.loop.train`.

    python train.py --config configs/demo.py [--config.<field>=<value> ...]

Multi-host: pass --coordinator_address/--num_processes/--process_id, or launch under a
cluster environment that jax.distributed.initialize detects (JAX_COORDINATOR_ADDRESS,
SLURM, Open MPI); every process runs the same command.
"""

import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for multi-process runs.")
flags.DEFINE_integer("num_processes", 0, "Number of processes (multi-process runs).")
flags.DEFINE_integer("process_id", -1, "This process's index (multi-process runs).")
flags.DEFINE_bool("library_logs", False, "Show INFO logs of libraries (orbax, grain, jax), not only ours.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if not FLAGS.library_logs:
    from ee_mllm_jax import logs  # pylint: disable=g-import-not-at-top
    logs.quiet_libraries(__file__)
  import jax  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax import experiment  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax import sharding  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax import storage  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax.train import loop  # pylint: disable=g-import-not-at-top
  sharding.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  try:
    summary = loop.train(FLAGS.config)
  except loop.USER_ERRORS as e:  # a bad setting, input or checkpoint, or a diverged run: one line, exit 1
    if isinstance(e, storage.DiskFullError):
      # Orbax's writer threads and event loops, torn down at exit with their failed writes,
      # print tracebacks of their own after this line: leave without that teardown.
      sys.stdout.flush()
      sys.stderr.write(f"error: {e}\n")
      sys.stderr.flush()
      os._exit(1)
    sys.exit(f"error: {e}")
  note = experiment.expected_range_note(FLAGS.config, config_flags.get_config_filename(FLAGS["config"]),
                                        config_flags.get_override_values(FLAGS["config"]), summary)
  if note and jax.process_index() == 0:
    print(note, flush=True)


def run():
  flags.mark_flag_as_required("config")
  try:
    app.run(main)
  except AttributeError as e:
    if FLAGS.is_parsed():
      raise
    # ml_collections rejects an unknown `--config.<field>` while the flags are parsed
    key = re.search(r"'([^'\\]+)", str(e))
    key = key.group(1) if key else str(e)
    suggestion = re.search(r'Did you mean \\?"([^"\\]+)', str(e))
    args = [a for a in sys.argv[1:] if a.startswith("--config.") and key in a.split("=")[0].split(".")]
    sys.exit(f"error: {args[0] if args else key}: the config has no field {key!r}"
             + (f" (did you mean {suggestion.group(1)!r}?)" if suggestion else ""))


if __name__ == "__main__":
  run()
