"""Runs a sweep: one train.py process per trial, each in DIR/<trial name>/.

  python sweep.py --config=configs/cifar100_ti.py --workdir=DIR                # its get_sweep()
  python sweep.py --config=configs/cifar100_ti.py --workdir=DIR \
      --sweep='learning_rate=[1e-3,3e-3] model.variant=[S/4,B/4]' --parallel=2
  python sweep.py --config=... --workdir=DIR --print_commands   # one command per trial
  python sweep.py --workdir=DIR --summarize                     # DIR/summary.{csv,md,png}

--sweep replaces the config file's get_sweep(); `--config.key=value` flags apply to every
trial. Every trial is validated before any starts. Running the same command again skips
finished trials and resumes the others. Exits non-zero unless every trial finished.
"""
import sys

from absl import app, flags
from ml_collections import config_flags

from mixer import cli_errors, sweep_runner, sweep_summary, sweeps

config_flags.DEFINE_config_file("config", None, "Experiment config file (with get_sweep).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Sweep directory: sweep.json, summaries, a dir per trial.",
                    required=True)
flags.DEFINE_string("sweep", None, "Product of value lists, e.g. 'learning_rate=[1e-3,3e-3] "
                    "seed=[0,1]'; values are Python literals, else strings.")
flags.DEFINE_integer("parallel", 1, "Trials run at once (GPUs are split evenly between them).")
flags.DEFINE_bool("print_commands", False, "Print one shell command per trial; run nothing.")
flags.DEFINE_bool("summarize", False, "Only rebuild DIR/summary.{csv,md,png}.")
flags.DEFINE_string("train_script", sweeps.TRAIN_SCRIPT, "The script each trial runs.")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.summarize:
    sweep_summary.summarize(FLAGS.workdir)
    print(f"Wrote {FLAGS.workdir}/summary.csv, summary.md and summary.png.")
    return
  if FLAGS.config is None:
    raise app.UsageError("--config is required (except with --summarize).")
  try:
    sweep = sweeps.make_sweep(
        config_flags.get_config_filename(FLAGS["config"]),
        sweeps.parse_sweep_flag(FLAGS.sweep) if FLAGS.sweep else None,
        config_flags.get_override_values(FLAGS["config"]), FLAGS.train_script)
    if FLAGS.print_commands:
      sweeps.save_sweep(sweep, FLAGS.workdir)  # lets --summarize read the runs later
      print("\n".join(sweeps.shell_commands(sweep, FLAGS.workdir)))
      return
    statuses = sweep_runner.run_sweep(sweep, FLAGS.workdir, FLAGS.parallel)
  except ValueError as e:
    sys.exit(f"sweep.py: {e}")
  sweep_summary.summarize(FLAGS.workdir)
  print(sweep_runner.report_line(FLAGS.workdir, statuses))
  if any(status != "finished" for status in statuses.values()):
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=cli_errors.parse_flags)
