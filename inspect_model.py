"""Looks inside a trained Mixer: python inspect_model.py --workdir=DIR [--checkpoint=best].

Writes to --out (default DIR/inspect/): token_mixing_block{K}.png, the hidden units of block
K's first token-mixing layer as pictures on the patch grid, and linear_probe.png/.json, the
test top-1 of a linear (ridge) probe on the frozen features of the stem, every block and
the pre-logits. (Not `inspect.py`: that name would hide Python's own `inspect` module.)
"""
from absl import app, flags

from mixer import cli_errors, runtime

flags.DEFINE_string("workdir", None, "A training run's directory.", required=True)
flags.DEFINE_string("checkpoint", "latest", "'latest', 'best' (by val/top1) or a step number.")
flags.DEFINE_string("npz", None, "A published-layout .npz (or timm .safetensors) to inspect instead of the run's "
                    "checkpoint; it must fit the model of the run's config.")
flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/inspect).")
flags.DEFINE_list("blocks", ["0", "1"], "Blocks whose token-mixing units are drawn.")
flags.DEFINE_integer("probe_examples", 10000, "Training examples the linear probes are fitted on.")
flags.DEFINE_string("data_dir", None, "TFDS data directory (default: the run's config, "
                    "then $TFDS_DATA_DIR, then ~/tensorflow_datasets).")
flags.DEFINE_integer("batch_size", None, "Batch size of the feature pass (default: the run's "
                     "eval_batch_size).")
flags.DEFINE_enum("parameters", "auto", ["auto", "ema", "trained"],
                  "'auto': the run's EMA parameters when it kept them, else the trained ones.")
FLAGS = flags.FLAGS


def main(argv):
  runtime.quiet_logs()
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from mixer import errors, inspection  # pylint: disable=g-import-not-at-top
  # A bad workdir, checkpoint or data, a full disk: one line (MIXER_DEBUG=1: the traceback).
  with cli_errors.user_errors():
    if not all(b.strip().isdigit() for b in FLAGS.blocks):
      raise errors.ConfigError(f"--blocks must be block numbers, got {','.join(FLAGS.blocks)}.")
    report = inspection.inspect_run(
        FLAGS.workdir, FLAGS.out, FLAGS.checkpoint, FLAGS.npz,
        [int(b) for b in FLAGS.blocks], FLAGS.probe_examples, FLAGS.data_dir, FLAGS.batch_size,
        FLAGS.parameters, progress=lambda line: print(line, flush=True))
  for line in report["summaries"]:
    print(line)


if __name__ == "__main__":
  runtime.prepare_process()
  app.run(main, flags_parser=cli_errors.parse_flags)
