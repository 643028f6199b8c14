"""`launch/match_breakdown.py`: each crystal in one class, tables by atoms per cell and element."""

import csv
import importlib.util
import pathlib

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "launch" / "match_breakdown.py"
spec = importlib.util.spec_from_file_location("match_breakdown", SCRIPT)
match_breakdown = importlib.util.module_from_spec(spec)
spec.loader.exec_module(match_breakdown)

COLUMNS = ["id", "formula", "num_atoms", "elements", "matched", "framework_matched", "rms_dist",
           "rebuilt_formula", "rebuilt_num_atoms", "reason"]
ROWS = [  # one crystal of each class
    ["a", "NaCl", "2", "Cl Na", "1", "1", "0.01", "NaCl", "2", ""],
    ["b", "KCl", "2", "Cl K", "0", "1", "", "NaCl", "2", ""],
    ["c", "SrTiO3", "5", "O Sr Ti", "0", "0", "", "SrTiO2", "4", ""],
    ["d", "BaTiO3", "5", "Ba O Ti", "0", "0", "", "BaTiO3", "5", ""],
    ["e", "Si", "8", "Si", "0", "0", "", "", "", "no_lattice"],
]


def test_each_crystal_falls_in_one_class_and_the_tables_add_up(tmp_path, capsys):
  path = tmp_path / "matches.csv"
  with open(path, "w", newline="") as handle:
    csv.writer(handle).writerows([COLUMNS, *ROWS])
  rows = list(csv.DictReader(open(path, newline="")))
  assert [match_breakdown.classify(r) for r in rows] == list(match_breakdown.CLASSES)
  match_breakdown.main(path)
  text = (tmp_path / "breakdown.md").read_text()
  # 2 atoms: one matched, one species; 5-8 atoms: atom count, geometry, no crystal.
  assert "| 1-4 | 2 | 50.0% | 50.0% | 0.0% | 0.0% | 0.0% |" in text
  assert "| 5-8 | 3 | 0.0% | 0.0% | 33.3% | 33.3% | 33.3% |" in text
  assert "| all | 5 | 20.0% | 20.0% | 20.0% | 20.0% | 20.0% |" in text
  assert (tmp_path / "breakdown.png").stat().st_size > 10_000
