"""Reading crystals: real CIF text in, every rejection reason out."""

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure
from pymatgen.io.cif import CifWriter

from crystal_vae import crystals


def _rocksalt() -> Structure:
  return Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"],
                                   [[0, 0, 0], [0.5, 0.5, 0.5]])


def test_cif_round_trip_keeps_lattice_coordinates_and_species():
  structure = _rocksalt()
  crystal = crystals.crystal_from_cif(str(CifWriter(structure)), "nacl",
                                      properties={"energy": -1.5})
  assert crystal.id == "nacl" and crystal.num_atoms == 8
  np.testing.assert_allclose(crystal.lattice, structure.lattice.matrix, atol=1e-6)
  assert sorted(crystal.atomic_numbers.tolist()) == [11] * 4 + [17] * 4
  assert np.all((crystal.frac_coords >= 0) & (crystal.frac_coords < 1))
  assert crystal.properties == {"energy": -1.5}
  # The crystal is the same structure, site for site.
  rebuilt = crystal.to_structure()
  assert rebuilt.matches(structure)


def test_fractional_coordinates_are_wrapped_into_unit_interval():
  structure = Structure(Lattice.cubic(4.0), ["Si"], [[-0.25, 1.0, 2.5]])
  crystal = crystals.crystal_from_structure(structure, "si")
  np.testing.assert_allclose(crystal.frac_coords, [[0.75, 0.0, 0.5]])


@pytest.mark.parametrize("reason, make", [
    (crystals.UNPARSABLE, lambda: crystals.crystal_from_cif("this is not a CIF", "x")),
    (crystals.DISORDERED, lambda: crystals.crystal_from_structure(
        Structure(Lattice.cubic(4.0), [{"Fe": 0.5, "Co": 0.5}], [[0, 0, 0]]), "x")),
    (crystals.NO_ATOMS, lambda: crystals.crystal_from_structure(
        Structure(Lattice.cubic(4.0), [], []), "x")),
    (crystals.Z_ABOVE_MAX, lambda: crystals.crystal_from_structure(
        Structure(Lattice.cubic(4.0), ["U"], [[0, 0, 0]]), "x", crystals.CrystalLimits(max_z=90))),
    (crystals.CELL_TOO_LARGE, lambda: crystals.crystal_from_structure(
        Structure(Lattice.tetragonal(4.0, 10.0), ["Si"], [[0, 0, 0]]), "x")),
    (crystals.TOO_MANY_ATOMS, lambda: crystals.crystal_from_structure(
        _rocksalt(), "x", crystals.CrystalLimits(max_atoms=7))),
    (crystals.DEGENERATE_CELL, lambda: crystals.crystal_from_structure(
        Structure(Lattice.cubic(0.5), ["Na"], [[0, 0, 0]]), "x")),
    (crystals.DEGENERATE_CELL, lambda: crystals.crystal_from_structure(
        Structure(Lattice.from_parameters(4, 4, 4, 90, 90, 0.5), ["Na"], [[0, 0, 0]]), "x")),
    (crystals.DEGENERATE_CELL, lambda: crystals.crystal_from_structure(
        Structure(Lattice(np.diag([-4.0, 4.0, 4.0])), ["Na"], [[0, 0, 0]]), "x")),
    (crystals.ATOMS_TOO_CLOSE, lambda: crystals.crystal_from_structure(
        Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.0001, 0, 0]]), "x")),
])
def test_each_rejection_has_its_reason(reason, make):
  with pytest.raises(crystals.RejectedCrystal) as info:
    make()
  assert info.value.reason == reason
  assert info.value.crystal_id == "x"


def test_close_atoms_are_measured_across_the_cell_boundary():
  # 0.02 and 0.98 of a 4 Å cell: 3.84 Å apart inside the cell, 0.16 Å through its face.
  structure = Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0.02, 0, 0], [0.98, 0, 0]])
  with pytest.raises(crystals.RejectedCrystal) as info:
    crystals.crystal_from_structure(structure, "x")
  assert info.value.reason == crystals.ATOMS_TOO_CLOSE and "0.16 Å" in info.value.detail
  # 0.6 Å apart is allowed (O-H bonds are ~1 Å).
  crystals.crystal_from_structure(
      Structure(Lattice.cubic(4.0), ["O", "H"], [[0, 0, 0], [0.15, 0, 0]]), "x")


def test_an_empty_file_is_named_as_such(tmp_path):
  path = tmp_path / "empty.cif"
  path.write_text("  \n")
  with pytest.raises(crystals.RejectedCrystal) as info:
    crystals.read_cif_file(path)
  assert info.value.reason == crystals.UNPARSABLE and info.value.detail == "empty file"


def test_a_negative_cell_length_in_a_cif_is_a_degenerate_cell():
  cif = str(CifWriter(_rocksalt())).replace("_cell_length_a   5.64", "_cell_length_a   -5.64")
  assert "-5.64" in cif
  with pytest.raises(crystals.RejectedCrystal) as info:
    crystals.crystal_from_cif(cif, "x")
  assert info.value.reason == crystals.DEGENERATE_CELL


def test_partial_occupancy_in_cif_text_is_disordered():
  text = str(CifWriter(Structure(Lattice.cubic(4.0), [{"Fe": 0.5}], [[0, 0, 0]])))
  with pytest.raises(crystals.RejectedCrystal) as info:
    crystals.crystal_from_cif(text, "half")
  assert info.value.reason == crystals.DISORDERED


def test_read_cif_file_uses_file_name_as_id(tmp_path):
  path = tmp_path / "rocksalt.cif"
  CifWriter(_rocksalt()).write_file(path)
  assert crystals.read_cif_file(path).id == "rocksalt"
  missing = tmp_path / "missing.cif"
  with pytest.raises(crystals.RejectedCrystal, match="missing.cif"):
    crystals.read_cif_file(missing)


def test_numeric_properties_keep_finite_numbers_only():
  row = {"material_id": "a", "cif": "...", "gap": "1.25", "formula": "NaCl", "e": "nan", "n": "3"}
  assert crystals.numeric_properties(row, exclude=("material_id", "cif")) == {"gap": 1.25, "n": 3.0}


def test_rejection_log_counts_and_lists(tmp_path):
  log = crystals.RejectionLog()
  log.keep()
  log.keep()
  log.reject(crystals.RejectedCrystal("a", crystals.NO_ATOMS, "empty"))
  log.reject(crystals.RejectedCrystal("b", crystals.NO_ATOMS, "empty"))
  log.reject(crystals.RejectedCrystal("c", crystals.DISORDERED, "mixed"))
  assert log.counts() == {crystals.NO_ATOMS: 2, crystals.DISORDERED: 1}
  assert log.summary() == "kept 2, skipped 3 (disordered=1, no_atoms=2)"
  log.write_csv(tmp_path / "rejected.csv")
  lines = (tmp_path / "rejected.csv").read_text().splitlines()
  assert lines[0] == "id,reason,detail" and lines[1] == "a,no_atoms,empty" and len(lines) == 4


def test_lattice_is_put_in_the_standard_orientation():
  """a along x, b in the xy plane: the orientation CIF files are read in."""
  rotated = Lattice(np.array([[-2.0725, -3.5897, 0.0], [-2.0725, 3.5897, 0.0], [0.0, 0.0, -9.496]]))
  structure = Structure(rotated, ["Hg", "S"], [[0.28, 0.28, 1 / 3], [0.51, 0.51, 0.83]])
  crystal = crystals.crystal_from_structure(structure, "cinnabar")
  np.testing.assert_allclose(crystal.lattice[0, 1:], 0.0, atol=1e-9)
  np.testing.assert_allclose(crystal.lattice[1, 2], 0.0, atol=1e-9)
  np.testing.assert_allclose(Lattice(crystal.lattice).parameters, rotated.parameters, atol=1e-9)
  assert crystal.to_structure().matches(structure)


def test_dummy_species_is_rejected_as_unparsable():
  structure = Structure(Lattice.cubic(4.0), ["X0+"], [[0, 0, 0]])
  with pytest.raises(crystals.RejectedCrystal) as info:
    crystals.crystal_from_structure(structure, "dummy")
  assert info.value.reason == crystals.UNPARSABLE and "X" in info.value.detail
