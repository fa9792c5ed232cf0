"""Exports a run's parameters as a published-layout Mixer .npz.

  python export.py --workdir=DIR [--checkpoint=latest|best|STEP] --out=mixer.npz

The file has the layout of the published MLP-Mixer checkpoints ('/'-joined Linen paths such
as `MixerBlock_3/token_mixing/Dense_0/kernel`), so other Mixer code can read it, and
`--config.init_from=mixer.npz` fine-tunes from it.
"""
from absl import app, flags

from mixer import cli_errors, runtime

flags.DEFINE_string("workdir", None, "A training run's directory.", required=True)
flags.DEFINE_string("checkpoint", "latest", "'latest', 'best' (by val/top1) or a step number.")
flags.DEFINE_string("out", None, "Path of the .npz to write.", required=True)
FLAGS = flags.FLAGS


def main(argv):
  runtime.quiet_logs()
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from mixer import pretrained, saved_runs  # pylint: disable=g-import-not-at-top
  # A bad workdir or checkpoint, an unwritable --out: one line (MIXER_DEBUG=1: the traceback).
  with cli_errors.user_errors():
    step, config, params = saved_runs.restore_params(FLAGS.workdir, FLAGS.checkpoint)
    pretrained.export_npz(params, FLAGS.out)
  print(f"Wrote the {saved_runs.describe_parameters(config)} of step {step} to {FLAGS.out}.")


if __name__ == "__main__":
  runtime.prepare_process()
  app.run(main, flags_parser=cli_errors.parse_flags)
