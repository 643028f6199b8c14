"""Learning curves: `python -m crystal_vae.learning_curves WORKDIR` draws WORKDIR/metrics.jsonl
(training and evaluation lines) to WORKDIR/learning_curves.png; training redraws it at a checkpoint
once a minute has passed since the last drawing, and at its last step."""

import pathlib
from collections.abc import Sequence

from absl import app

from crystal_vae import metric_writer

# (panel title, y label, metric names, log scale)
PANELS = (
    ("Reconstruction", "voxel MSE", ("mse",), True),
    ("Segmentation loss", "species-head loss", ("seg", "seg_true"), True),
    ("KL divergence", "KL (nats, summed over the latent)", ("kl",), True),
    ("Species", "fraction", ("atom_voxel_recall", "atom_voxel_accuracy", "site_z_right",
                             "composition_exact"), False),
)
LABELS = {"seg_true": "seg (true density)", "atom_voxel_recall": "atom voxels found",
          "atom_voxel_accuracy": "atom voxels, species right",
          "site_z_right": "atom voxels, density's Z within 0.5",
          "composition_exact": "composition exact (head)"}


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
  """The records of WORKDIR/metrics.jsonl, in file order."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    raise FileNotFoundError(f"no metrics.jsonl in {workdir}: has a training run written there?")
  return metric_writer.read_records(path)


def plot(records: Sequence[dict], path: str | pathlib.Path, title: str = "") -> pathlib.Path:
  """One panel per entry of PANELS: each metric against step, one line per split."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot  # pylint: disable=import-outside-toplevel

  splits = sorted({r["split"] for r in records}, key=lambda s: (s != "train", s))
  figure, axes = pyplot.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.6))
  for axis, (panel, ylabel, names, log) in zip(axes, PANELS):
    drawn = False
    for split in splits:
      for name in names:
        points = [(r["step"], r[name]) for r in records
                  if r["split"] == split and name in r and r[name] is not None]
        if not points:
          continue
        steps, values = zip(*points)
        style = "-" if split == "train" else "o--"
        axis.plot(steps, values, style, markersize=3, label=f"{LABELS.get(name, name)} ({split})")
        drawn = True
    axis.set_title(panel)
    axis.set_xlabel("training step")
    axis.set_ylabel(ylabel)
    if drawn:
      if log:
        axis.set_yscale("log")
      axis.legend(fontsize=7)
    else:
      axis.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=axis.transAxes)
    axis.grid(alpha=0.3)
  if title:
    figure.suptitle(title)
  figure.tight_layout()
  path = pathlib.Path(path)
  figure.savefig(path, dpi=100)
  pyplot.close(figure)
  return path


def draw(workdir: str | pathlib.Path) -> pathlib.Path:
  """WORKDIR/metrics.jsonl -> WORKDIR/learning_curves.png."""
  workdir = pathlib.Path(workdir)
  return plot(read_metrics(workdir), workdir / "learning_curves.png", title=str(workdir.name))


def main(argv: list[str]) -> None:
  if len(argv) != 2:
    raise app.UsageError("usage: python -m crystal_vae.learning_curves WORKDIR")
  try:
    print(f"wrote {draw(argv[1])}")
  except FileNotFoundError as error:
    raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
  app.run(main)
