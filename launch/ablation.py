"""The ablation of issue 8: the CPU recipe on perov_5 with each of its changes undone, same budget.

    python launch/ablation.py --runs=runs/ablation --steps=400

Trains `configs/repeat.py:cpu` for `--steps` steps once as is and once per variant below (each
a separate workdir under `--runs`; re-running resumes or skips what is done), evaluates each on
the first `--eval_crystals` validation crystals, reading atoms both off the decoded density (the
recipe) and with the U-Net segmenter (the paper), and prints a Markdown table (also written to
RUNS/table.md) of the last validation log and both evaluations.
"""

import json
import pathlib
import shutil
import subprocess
import sys
import time

from absl import app
from absl import flags

_RUNS = flags.DEFINE_string("runs", "runs/ablation", "Where the workdirs go.")
_STEPS = flags.DEFINE_integer("steps", 400, "Training steps of every run.")
_DATA = flags.DEFINE_string("data", "../shared/data/perov_5", "The perov_5 CSV folder.")
_EVAL_CRYSTALS = flags.DEFINE_integer("eval_crystals", 64, "Validation crystals evaluated.")
_ONLY = flags.DEFINE_list("only", [], "Run only these variants (default: all, in order).")

_PAPER_SEGMENTATION = ("--config.model.species_head=classes", "--config.loss.balanced=False",
                       "--config.loss.teacher_forcing=0.0")
# name -> (what is undone, overrides of configs/repeat.py:cpu)
VARIANTS = {
    "recipe": ("nothing (`configs/repeat.py:cpu`)", ()),
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
_VALIDATION_KEYS = ("mse", "kl", "atom_voxel_recall", "empty_voxel_accuracy", "atom_voxel_accuracy")
_EVAL_KEYS = ("valid_rate", "framework_match_rate", "match_rate", "species_exact",
              "distance_predicted_to_true_p50", "distance_true_to_predicted_p50")
_ATOMS_FROM = ("density", "segmenter")


def _main_command(workdir: pathlib.Path, *args: str) -> list[str]:
  return [sys.executable, "-m", "crystal_vae.main", f"--workdir={workdir}", *args]


def _run(command: list[str], log: pathlib.Path) -> float:
  """Runs `command` with its output appended to `log`; returns the wall time in seconds."""
  start = time.time()
  with log.open("a") as out:
    out.write(f"$ {' '.join(command)}\n")
    out.flush()
    subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=True)
  return time.time() - start


def _train_and_evaluate(name: str, overrides: tuple[str, ...]) -> dict:
  workdir = pathlib.Path(_RUNS.value) / name
  workdir.mkdir(parents=True, exist_ok=True)
  log = workdir.parent / f"{name}.log"
  timing_path = workdir / "ablation_seconds.json"
  timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}
  if "train" not in timing:
    timing["train"] = _run(_main_command(
        workdir, "--config=configs/repeat.py:cpu", f"--config.dataset.path={_DATA.value}",
        f"--config.num_train_steps={_STEPS.value}", *overrides), log)
    timing_path.write_text(json.dumps(timing))
  batches = -(-_EVAL_CRYSTALS.value // 32)
  results = {}
  for atoms_from in _ATOMS_FROM:
    kept = workdir / f"eval_{atoms_from}.json"
    if not kept.exists():
      _run(_main_command(workdir, "--mode=evaluate", f"--config.eval.atoms_from={atoms_from}",
                         "--config.eval.batch_size=32", f"--config.eval.num_batches={batches}"),
           log)
      shutil.copy(workdir / "eval" / "validation" / "metrics.json", kept)
    results[atoms_from] = json.loads(kept.read_text())
  validation = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  results["validation"] = [row for row in validation if row["split"] == "validation"][-1]
  results["minutes"] = timing["train"] / 60
  return results


def _table(rows: dict[str, dict]) -> str:
  header = (["variant (undone)", "train min"] + [f"val. {k}" for k in _VALIDATION_KEYS]
            + [f"{k} ({a})" for a in _ATOMS_FROM for k in _EVAL_KEYS])
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for name, result in rows.items():
    cells = [f"{name}: {VARIANTS[name][0]}", f"{result['minutes']:.0f}"]
    cells += [f"{result['validation'][k]:.3g}" for k in _VALIDATION_KEYS]
    cells += [f"{result[a][k]:.3g}" if result[a].get(k) is not None else "—"
              for a in _ATOMS_FROM for k in _EVAL_KEYS]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv):
  del argv
  names = _ONLY.value or list(VARIANTS)
  unknown = sorted(set(names) - set(VARIANTS))
  if unknown:
    raise app.UsageError(f"unknown variants {unknown}; known: {list(VARIANTS)}")
  rows = {}
  for name in names:
    rows[name] = _train_and_evaluate(name, VARIANTS[name][1])
    table = _table(rows)
    (pathlib.Path(_RUNS.value) / "table.md").write_text(table + "\n")
  print(table)


if __name__ == "__main__":
  app.run(main)
