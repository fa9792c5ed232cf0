"""Evaluates a checkpoint of a run: python evaluate.py --workdir=DIR [--checkpoint=best].

Scores every example of --split once and writes DIR/eval/<split>_step<STEP>.json (top-1/5,
loss, per-class and per-superclass accuracy, calibration error) with PNGs beside it.
"""
from absl import app, flags

from mixer import cli_errors, runtime

flags.DEFINE_string("workdir", None, "A training run's directory.", required=True)
flags.DEFINE_string("checkpoint", "latest", "'latest', 'best' (by val/top1) or a step number.")
flags.DEFINE_string("split", "test", "TFDS split to evaluate, e.g. 'test' or 'train[:10%]'.")
flags.DEFINE_string("data_dir", None, "TFDS data directory (default: the run's config, "
                    "then $TFDS_DATA_DIR, then ~/tensorflow_datasets).")
flags.DEFINE_integer("batch_size", None, "Eval batch size (default: the run's eval_batch_size).")
flags.DEFINE_enum("parameters", "auto", ["auto", "ema", "trained"],
                  "'auto': the run's EMA parameters when it kept them, else the trained ones.")
flags.DEFINE_bool("single_view", False, "One view per image, without the run's test-time "
                  "augmentation (eval_flip, eval_shift): the number to compare across codebases.")
FLAGS = flags.FLAGS


def main(argv):
  runtime.quiet_logs()
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from mixer import evaluation, evaluator  # pylint: disable=g-import-not-at-top
  # A bad workdir, checkpoint or data, a full disk: one line (MIXER_DEBUG=1: the traceback).
  with cli_errors.user_errors():
    report = evaluation.evaluate_checkpoint(FLAGS.workdir, FLAGS.checkpoint, FLAGS.split,
                                            FLAGS.data_dir, FLAGS.batch_size, FLAGS.parameters,
                                            FLAGS.single_view)
  how = report["parameters_described"]
  views = evaluator.describe_views(report["eval_flip"], report["eval_shift"])
  how += f", {views}" if views else ""
  how += ", one view per image" if FLAGS.single_view else ""
  print(f"{report['dataset']}:{report['split']} at step {report['step']} ({how})")
  rows = [("examples", f"{report['num_examples']}"), ("top1", f"{report['top1']:.4f}"),
          ("top5", f"{report['top5']:.4f}"), ("loss", f"{report['loss']:.4f}"),
          ("ece", f"{report['ece']:.4f}")]
  if "superclass_top1" in report:
    rows.append(("superclass top1", f"{report['superclass_top1']:.4f}"))
  for name, value in rows:
    print(f"  {name:<16} {value}")
  print("  worst classes:")
  for name, accuracy in evaluation.worst_classes(report["per_class_top1"], 5):
    print(f"    {accuracy:.3f}  {name}")
  print("Wrote:")
  for path in report["files"]:
    print(f"  {path}")


if __name__ == "__main__":
  runtime.prepare_process()
  app.run(main, flags_parser=cli_errors.parse_flags)
