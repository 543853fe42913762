"""Train EE-MLLM (or its LLaVA baseline): flags -> config -> `ee_mllm_jax.train.loop.train`.

    python train.py --config configs/demo.py [--config.<field>=<value> ...]

Multi-host: pass --coordinator_address/--num_processes/--process_id, or launch under a
cluster environment that jax.distributed.initialize detects (JAX_COORDINATOR_ADDRESS,
SLURM, Open MPI); every process runs the same command.
"""

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for multi-process runs.")
flags.DEFINE_integer("num_processes", 0, "Number of processes (multi-process runs).")
flags.DEFINE_integer("process_id", -1, "This process's index (multi-process runs).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from ee_mllm_jax import sharding  # pylint: disable=g-import-not-at-top
  from ee_mllm_jax.train import loop  # pylint: disable=g-import-not-at-top
  sharding.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  loop.train(FLAGS.config)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
