"""An ablation of the CPU recipe: the recipe on perov_5 with each of its changes undone, same budget.

    python launch/benchmarks/ablation.py --runs=runs/ablation --steps=400

Trains the CPU recipe with the U-Net (`configs/repeat.py:cpu` with a U-Net,
`SEGMENTER_RECIPE`) for `--steps` steps once as is and once per variant below (each a separate
workdir under `--runs`; re-running resumes or skips what is done), evaluates each on
the first `--eval_crystals` validation crystals, reading atoms both off the decoded density (the
recipe) and with the U-Net segmenter (the paper), and prints a Markdown table (also written to
RUNS/table.md, as in README) of the last validation log and both evaluations.
"""

import json
import pathlib
import shutil
import subprocess
import sys

from absl import app
from absl import flags

_RUNS = flags.DEFINE_string("runs", "runs/ablation", "Where the workdirs go.")
_STEPS = flags.DEFINE_integer("steps", 400, "Training steps of every run.")
_DATA = flags.DEFINE_string("data", "../shared/data/perov_5", "The perov_5 CSV folder.")
_EVAL_CRYSTALS = flags.DEFINE_integer("eval_crystals", 64, "Validation crystals evaluated.")
_ONLY = flags.DEFINE_list("only", [], "Run only these variants (default: all, in order).")

# configs/repeat.py:cpu back to its earlier recipe, whose changes the variants undo: the
# U-Net (mask + Z head, balanced loss, teacher forcing), a 64-d latent, no composition head.
SEGMENTER_RECIPE = (
    "--config.model.segmenter=True", "--config.loss.teacher_forcing=1.0",
    "--config.model.unet_features=(4,8,16)", "--config.model.latent_dim=64",
    "--config.model.encoder_features=(8,16,32,32)", "--config.model.encoder_strides=(2,1,1,2)",
    "--config.model.composition_head=False", "--config.loss.composition_weight=0.1",
    "--config.lr_mults=()", "--config.loss.beta=1e-4")
_PAPER_SEGMENTATION = ("--config.model.species_head=classes", "--config.loss.balanced=False",
                       "--config.loss.teacher_forcing=0.0")
# name -> (what is undone, overrides of the recipe)
VARIANTS = {
    "recipe": ("nothing (the recipe: `configs/repeat.py:cpu` with the U-Net)", ()),
    "paper_segmentation": ("the three species changes together (paper's U-Net loss and head)",
                           _PAPER_SEGMENTATION),
    "paper": ("all of them, and the paper's Adam 1e-5", (
        "--config.voxel.random_offset=True", "--config.lr_schedule=constant",
        "--config.grad_clip_norm=0.0", "--config.model.decoder_output=relu",
        "--config.learning_rate=1e-5") + _PAPER_SEGMENTATION),
    "random_offsets": ("cubes at random offsets (paper)", ("--config.voxel.random_offset=True",)),
    "constant_lr": ("constant Adam 3e-4, no warm-up, no clipping",
                    ("--config.lr_schedule=constant", "--config.grad_clip_norm=0.0")),
    "relu_output": ("ReLU decoder output (paper)", ("--config.model.decoder_output=relu",)),
    "classes_head": ("101-class species softmax (paper)", ("--config.model.species_head=classes",)),
    "unbalanced": ("unweighted cross-entropy (paper)", ("--config.loss.balanced=False",)),
    "no_teacher_forcing": ("U-Net trained on the decoded density only (paper)",
                           ("--config.loss.teacher_forcing=0.0",)),
}


def _main_command(workdir: pathlib.Path, *args: str) -> list[str]:
  return [sys.executable, "-m", "crystal_vae.main", f"--workdir={workdir}", *args]


def _run(command: list[str], log: pathlib.Path) -> None:
  """Runs `command` with its output appended to `log`."""
  with log.open("a") as out:
    out.write(f"$ {' '.join(command)}\n")
    out.flush()
    subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=True)


def _train_and_evaluate(name: str, overrides: tuple[str, ...]) -> dict:
  """Trains (or resumes, a no-op once done) and evaluates one variant, both atom readers."""
  workdir = pathlib.Path(_RUNS.value) / name
  workdir.mkdir(parents=True, exist_ok=True)
  log = workdir.parent / f"{name}.log"
  _run(_main_command(workdir, "--config=configs/repeat.py:cpu",
                     f"--config.dataset.path={_DATA.value}",
                     f"--config.num_train_steps={_STEPS.value}", *SEGMENTER_RECIPE, *overrides),
       log)
  batches = -(-_EVAL_CRYSTALS.value // 32)
  results = {}
  for atoms_from in ("density", "segmenter"):
    kept = workdir / f"eval_{atoms_from}.json"
    if not kept.exists():
      _run(_main_command(workdir, "--mode=evaluate", f"--config.eval.atoms_from={atoms_from}",
                         "--config.eval.batch_size=32", f"--config.eval.num_batches={batches}"),
           log)
      shutil.copy(workdir / "eval" / "validation" / "metrics.json", kept)
    results[atoms_from] = json.loads(kept.read_text())
  validation = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  results["validation"] = [row for row in validation if row["split"] == "validation"][-1]
  return results


_HEADER = ("| undone | val. voxel MSE | KL | atom voxels found (mask) | empty voxels right | species"
           " right (atom voxels) | density path: species exact | density path: nearest-atom p50"
           " decoded → true / true → decoded | segmenter path: species exact |\n"
           "|---|---|---|---|---|---|---|---|---|")


def _row(name: str, result: dict) -> str:
  validation, density = result["validation"], result["density"]
  distances = (f"{density['distance_predicted_to_true_p50']:.2f} / "
               f"{density['distance_true_to_predicted_p50']:.2f} Å"
               if density.get("distance_predicted_to_true_p50") is not None else "—")
  return (f"| {VARIANTS[name][0]} | {validation['mse']:.3f} | {validation['kl']:.0f} |"
          f" {validation['atom_voxel_recall']:.1%} | {validation['empty_voxel_accuracy']:.1%} |"
          f" {validation['atom_voxel_accuracy']:.1%} | {density['species_exact']:.1%} |"
          f" {distances} | {result['segmenter']['species_exact']:.1%} |")


def main(argv):
  del argv
  names = _ONLY.value or list(VARIANTS)
  unknown = sorted(set(names) - set(VARIANTS))
  if unknown:
    raise app.UsageError(f"unknown variants {unknown}; known: {list(VARIANTS)}")
  rows = [_HEADER]
  for name in names:
    rows.append(_row(name, _train_and_evaluate(name, VARIANTS[name][1])))
    (pathlib.Path(_RUNS.value) / "table.md").write_text("\n".join(rows) + "\n")
  print("\n".join(rows))


if __name__ == "__main__":
  app.run(main)
