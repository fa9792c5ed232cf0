"""Classifies image files with a trained run: python predict.py --workdir=DIR IMAGE...

Each PNG/JPEG is converted to 8-bit RGB (16-bit grey scaled by 1/257, transparency over
white; mixer.evaluation.to_rgb) and resized to the model's input size; prints the top-5
classes with their probabilities. Unreadable files (missing, undecodable, of a mode with no
defined RGB such as float 'F', or more pixels than PIL's Image.MAX_IMAGE_PIXELS) are reported
and the others still classified; the exit status is 1 if any file failed. MIXER_DEBUG=1
shows the traceback of a fatal error.
"""
import sys

from absl import app, flags

from mixer import cli_errors, runtime

flags.DEFINE_string("workdir", None, "A training run's directory.", required=True)
flags.DEFINE_string("checkpoint", "latest", "'latest', 'best' (by val/top1) or a step number.")
flags.DEFINE_string("data_dir", None, "TFDS data directory, only for the class names when the "
                    "run has no class_names.json.")
flags.DEFINE_integer("top_k", 5, "How many classes to print per image.")
FLAGS = flags.FLAGS


def main(argv):
  runtime.quiet_logs()
  if len(argv) < 2:
    raise app.UsageError("Give one or more image files: predict.py --workdir=DIR IMAGE...")
  from mixer import evaluation, evaluator, saved_runs, workdir as layout  # pylint: disable=g-import-not-at-top
  with cli_errors.user_errors():  # bad workdir or checkpoint: one line (MIXER_DEBUG=1: traceback)
    step, predictions = evaluation.predict_files(FLAGS.workdir, argv[1:], FLAGS.checkpoint,
                                                 FLAGS.data_dir, FLAGS.top_k)
  config = layout.load_config(FLAGS.workdir)
  how = saved_runs.describe_parameters(config)
  views = evaluator.describe_views(config.eval_flip, config.eval_shift)
  how += f", {views}" if views else ""
  print(f"Checkpoint: step {step} of {FLAGS.workdir} ({how})")
  for prediction in predictions:
    if prediction.error:
      print(f"{prediction.path}: error: {prediction.error}", file=sys.stderr)
      continue
    print(prediction.path)
    for name, probability in prediction.top:
      print(f"  {probability:7.2%}  {name}")
  return 1 if any(p.error for p in predictions) else 0


if __name__ == "__main__":
  runtime.prepare_process()
  app.run(main, flags_parser=cli_errors.parse_flags)
