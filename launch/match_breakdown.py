"""What limits the match: an evaluation's `matches.csv` broken down by atoms per cell and by element.

    python launch/match_breakdown.py WORKDIR/eval/test/matches.csv

Each crystal falls in one class: `matched` (StructureMatcher fits), `species` (the framework
fits, the species do not), `atom count` (a crystal with another number of atoms per cell),
`geometry` (the same number of atoms, the framework does not fit) or `no crystal`. Writes
`breakdown.md` (two tables: by atoms per cell, by element over the crystals that hold it) and
`breakdown.png` beside the CSV, and prints the tables.
"""

import collections
import csv
import pathlib
import sys

import numpy as np

from crystal_vae import plots

CLASSES = ("matched", "species", "atom count", "geometry", "no crystal")
SIZE_BINS = ((1, 4), (5, 8), (9, 16), (17, 32), (33, 64), (65, 10_000))


def classify(row: dict[str, str]) -> str:
  if row["matched"] == "1":
    return "matched"
  if not row["rebuilt_formula"]:
    return "no crystal"
  if row["framework_matched"] == "1":
    return "species"
  if int(row["rebuilt_num_atoms"]) != int(row["num_atoms"]):
    return "atom count"
  return "geometry"


def table(groups: dict[str, list[str]], title: str) -> list[str]:
  lines = [f"| {title} | crystals | " + " | ".join(CLASSES) + " |",
           "|---|---:|" + "---:|" * len(CLASSES)]
  for name, classes in groups.items():
    counts = collections.Counter(classes)
    lines.append(f"| {name} | {len(classes)} | " + " | ".join(
        f"{100 * counts[c] / len(classes):.1f}%" for c in CLASSES) + " |")
  return lines


def main(path: pathlib.Path) -> None:
  with open(path, newline="") as handle:
    rows = list(csv.DictReader(handle))
  classes = [classify(row) for row in rows]
  by_size = {}
  for low, high in SIZE_BINS:
    chosen = [c for row, c in zip(rows, classes) if low <= int(row["num_atoms"]) <= high]
    if chosen:
      by_size[f"{low}-{high}" if high < 10_000 else f"> {low - 1}"] = chosen
  by_element = collections.defaultdict(list)
  for row, c in zip(rows, classes):
    for element in row["elements"].split():
      by_element[element].append(c)
  common = dict(sorted(((e, c) for e, c in by_element.items() if len(c) >= 20),
                       key=lambda item: -len(item[1])))
  lines = [f"{len(rows)} crystals of {path}", "", *table({"all": classes}, "set"), "",
           *table(by_size, "atoms per cell"), "",
           *table(common, "element (in >= 20 crystals)")]
  out = path.with_name("breakdown.md")
  out.write_text("\n".join(lines) + "\n")
  print("\n".join(lines))
  plt = plots.pyplot()
  figure, axes = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1, 3]})
  for axis, groups, label in ((axes[0], by_size, "atoms per cell"),
                              (axes[1], dict(list(common.items())[:30]), "element")):
    names = list(groups)
    bottom = np.zeros(len(names))
    for c in CLASSES:
      share = np.array([100 * groups[n].count(c) / len(groups[n]) for n in names])
      axis.bar(names, share, bottom=bottom, label=c)
      bottom += share
    axis.set_xlabel(label)
    axis.set_ylabel("% of crystals")
    axis.tick_params(axis="x", labelrotation=90 if label == "element" else 0, labelsize=8)
  axes[0].legend(fontsize=8)
  figure.suptitle(f"what limits the match ({len(rows)} crystals)")
  figure.tight_layout()
  figure.savefig(path.with_name("breakdown.png"), dpi=100)
  print(f"wrote {out} and {path.with_name('breakdown.png')}")


if __name__ == "__main__":
  if len(sys.argv) != 2:
    raise SystemExit("usage: python launch/match_breakdown.py EVAL_DIR/matches.csv")
  main(pathlib.Path(sys.argv[1]))
