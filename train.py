"""Trains a Mixer: python train.py --config=configs/cifar100_s.py --workdir=DIR.

Running the same command again resumes from the latest checkpoint in DIR.
Several processes (hosts): under `srun` with several tasks nothing more is needed (JAX reads
SLURM's environment); elsewhere pass --num_processes, --process_id, --coordinator_address.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from mixer import cli_errors, runtime

config_flags.DEFINE_config_file("config", "configs/cifar100_s.py", "Experiment config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and config.json.",
                    required=True)
flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run (default: SLURM's "
                     "task count under srun, else 1).")
flags.DEFINE_integer("process_id", 0, "This process's index in a multi-process run.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
flags.DEFINE_list("allow_config_change", [], "Run-defining config keys that may differ from "
                  "the workdir's recorded config on resume, e.g. 'num_epochs,total_steps'.")
FLAGS = flags.FLAGS


def main(argv):
  runtime.quiet_logs()
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import jax  # pylint: disable=g-import-not-at-top
  explicit = FLAGS.num_processes is not None and FLAGS.num_processes > 1
  if explicit or (FLAGS.num_processes is None and runtime.slurm_step_tasks() > 1):
    if jax.config.jax_platforms in (None, "", "cpu"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
      jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                                 FLAGS.process_id)
    else:  # JAX's SLURM detection: coordinator, process count and index from srun's env
      jax.distributed.initialize()
  from mixer import train_lib  # pylint: disable=g-import-not-at-top
  logging.info("%s.", runtime.describe_devices())
  with cli_errors.user_errors():
    result = train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir,
                                          tuple(FLAGS.allow_config_change))
  logging.info("Done: %s", result)


if __name__ == "__main__":
  runtime.prepare_process()
  app.run(main, flags_parser=cli_errors.parse_flags)
