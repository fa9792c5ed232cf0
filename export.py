"""Exports a run's parameters as a published-layout Mixer .npz or as timm's MlpMixer.

  python export.py --workdir=DIR [--checkpoint=latest|best|STEP] --out=mixer.npz
  python export.py --workdir=DIR --format=timm --out=mixer.safetensors

`npz` has the layout of the published MLP-Mixer checkpoints ('/'-joined Linen paths such as
`MixerBlock_3/token_mixing/Dense_0/kernel`); `timm` is timm's `MlpMixer` state dict in
safetensors with, beside it (mixer.json), the constructor arguments and preprocessing that
rebuild it in PyTorch (README, "Export to PyTorch/timm"). `--config.init_from=` fine-tunes
from either. The EMA parameters when the run kept them, as evaluate.py scores.
"""
from absl import app, flags

from mixer import cli_errors, runtime

FORMATS = {"npz": ".npz", "timm": ".safetensors"}
flags.DEFINE_string("workdir", None, "A training run's directory.", required=True)
flags.DEFINE_string("checkpoint", "latest", "'latest', 'best' (by val/top1) or a step number.")
flags.DEFINE_enum("format", "npz", list(FORMATS), "npz: the published Mixer layout; timm: "
                  "timm's MlpMixer state dict (.safetensors) and a .json to rebuild it.")
flags.DEFINE_string("out", None, "Path of the file to write (.npz or .safetensors).",
                    required=True)
FLAGS = flags.FLAGS


def main(argv):
  runtime.quiet_logs()
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from mixer import errors, pretrained, saved_runs  # pylint: disable=g-import-not-at-top
  # A bad workdir or checkpoint, an unwritable --out: one line (MIXER_DEBUG=1: the traceback).
  with cli_errors.user_errors():
    suffix = FORMATS[FLAGS.format]
    if not FLAGS.out.endswith(suffix):
      raise errors.ConfigError(f"--format={FLAGS.format} writes a {suffix} file; --out="
                               f"{FLAGS.out!r} does not end with {suffix}.")
    step, config, params = saved_runs.restore_params(FLAGS.workdir, FLAGS.checkpoint)
    described = saved_runs.describe_parameters(config)
    if FLAGS.format == "timm":
      meta = pretrained.export_timm(params, FLAGS.out, step=step, parameters=described,
                                    workdir=FLAGS.workdir)
      print(f"Wrote the {described} of step {step} as timm's MlpMixer to {FLAGS.out} "
            f"(rebuild it with {meta}).")
    else:
      pretrained.export_npz(params, FLAGS.out)
      print(f"Wrote the {described} of step {step} to {FLAGS.out}.")


if __name__ == "__main__":
  runtime.prepare_process()
  app.run(main, flags_parser=cli_errors.parse_flags)
