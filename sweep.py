"""Runs a sweep: one train.py process per trial, each in DIR/<trial name>/.

  python sweep.py --config=configs/cifar100_ti.py --workdir=DIR                # its get_sweep()
  python sweep.py --config=configs/cifar100_ti.py --workdir=DIR \
      --sweep='learning_rate=[1e-3,3e-3] model.variant=[S/4,B/4]' --parallel=2
  python sweep.py --config=... --workdir=DIR --sweep='random_erasing=[0.0,0.25]' \
      --config.budget_pflop=0.05 --seeds=3        # 3 replicates each, at equal compute
  python sweep.py --config=... --workdir=DIR --print_commands   # one command per trial
  python sweep.py --workdir=DIR --summarize                     # DIR/summary.{csv,md,png}
  python sweep.py --config=... --workdir=DIR --launcher=slurm --slurm_partition=gpu \
      --slurm_gpus_per_trial=8 --slurm_time_min=240             # one SLURM job per trial

--sweep replaces the config file's get_sweep(); `--config.key=value` flags apply to every
trial. --seeds=N runs every trial with seeds 0..N-1; the summary groups the replicates (mean,
95% interval, Welch p-value against the best). Every trial is validated before any starts. Running the same command again skips
finished trials and resumes the others. Exits non-zero unless every trial finished.
--launcher=slurm submits each trial as a SLURM job through submitit (a job array), requeued
from its checkpoint when preempted or near its time limit (mixer/sweep_submitit.py);
--launcher=submitit_local runs that same path on this machine. --no_wait returns once the
jobs are submitted; --summarize collects them later.
"""
import sys

from absl import app, flags
from ml_collections import config_flags

from mixer import cli_errors, sweep_runner, sweep_submitit, sweep_summary, sweeps

config_flags.DEFINE_config_file("config", None, "Experiment config file (with get_sweep).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Sweep directory: sweep.json, summaries, a dir per trial.",
                    required=True)
flags.DEFINE_string("sweep", None, "Product of value lists, e.g. 'learning_rate=[1e-3,3e-3] "
                    "seed=[0,1]'; values are Python literals, else strings.")
flags.DEFINE_integer("seeds", None, "Replicates: run every trial with seed=0..N-1 (in "
                     "DIR/<trial>,seed=K/); summaries give each trial's mean and 95% interval.")
flags.DEFINE_integer("parallel", 1, "Trials run at once (GPUs are split evenly between them).")
flags.DEFINE_bool("print_commands", False, "Print one shell command per trial; run nothing.")
flags.DEFINE_bool("summarize", False, "Only rebuild DIR/summary.{csv,md,png}.")
flags.DEFINE_string("train_script", sweeps.TRAIN_SCRIPT, "The script each trial runs.")
flags.DEFINE_enum("launcher", "local", sweep_submitit.LAUNCHERS,
                  "local: train.py subprocesses here; slurm: one SLURM job per trial (submitit); "
                  "submitit_local: submitit's path on this machine.")
flags.DEFINE_bool("no_wait", False, "slurm/submitit_local: return once the jobs are submitted.")
flags.DEFINE_string("slurm_partition", None, "SLURM partition of the trials' jobs.")
flags.DEFINE_integer("slurm_gpus_per_trial", 0, "GPUs per node of each trial's job.")
flags.DEFINE_integer("slurm_nodes", 1, "Nodes per trial (one train.py process per node).")
flags.DEFINE_integer("slurm_time_min", 24 * 60, "Time limit of each job, minutes; the job is "
                     "requeued from its checkpoint when it runs out.")
flags.DEFINE_integer("slurm_cpus_per_task", None, "CPUs per node of each trial's job.")
flags.DEFINE_float("slurm_mem_gb", None, "Memory per node of each trial's job, GB.")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  with cli_errors.user_errors():
    if FLAGS.summarize:
      sweep_summary.summarize(FLAGS.workdir)
      print(f"Wrote {FLAGS.workdir}/summary.csv, summary.md and summary.png.")
      print(sweep_runner.report_line(FLAGS.workdir, sweep_runner.statuses(FLAGS.workdir)))
      return
    if FLAGS.config is None:
      raise app.UsageError("--config is required (except with --summarize).")
    statuses = _run(sweeps.make_sweep(
        config_flags.get_config_filename(FLAGS["config"]),
        sweeps.parse_sweep_flag(FLAGS.sweep) if FLAGS.sweep else None,
        config_flags.get_override_values(FLAGS["config"]), FLAGS.train_script, FLAGS.seeds))
    if statuses is None:
      return
    sweep_summary.summarize(FLAGS.workdir)
    print(sweep_runner.report_line(FLAGS.workdir, statuses))
  if any(status != "finished" for status in statuses.values()):
    sys.exit(1)


def _run(sweep: sweeps.Sweep) -> dict[str, str] | None:
  """Runs or submits the sweep; None when there is nothing to wait for."""
  if FLAGS.print_commands:
    sweeps.save_sweep(sweep, FLAGS.workdir)  # lets --summarize read the runs later
    print("\n".join(sweeps.shell_commands(sweep, FLAGS.workdir)))
    return None
  if FLAGS.launcher == "local":
    return sweep_runner.run_sweep(sweep, FLAGS.workdir, FLAGS.parallel)
  options = sweep_submitit.JobOptions(
      partition=FLAGS.slurm_partition, gpus_per_trial=FLAGS.slurm_gpus_per_trial,
      nodes=FLAGS.slurm_nodes, time_min=FLAGS.slurm_time_min,
      cpus_per_task=FLAGS.slurm_cpus_per_task, mem_gb=FLAGS.slurm_mem_gb)
  statuses = sweep_submitit.submit_sweep(sweep, FLAGS.workdir, FLAGS.launcher, options,
                                         wait=not FLAGS.no_wait)
  if FLAGS.no_wait:
    print(f"Submitted; collect with: python sweep.py --workdir={FLAGS.workdir} --summarize")
    return None
  return statuses


if __name__ == "__main__":
  app.run(main, flags_parser=cli_errors.parse_flags)
