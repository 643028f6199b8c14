"""CDVAE's generation metrics against hand-made cases (generation_metrics.py)."""

import numpy as np
import pytest
from pymatgen.core import Element, Lattice, Structure

from crystal_vae import generation_metrics

AMU_IN_GRAMS = 1.66053906660e-24
CUBIC_ANGSTROM_IN_CM3 = 1e-24


def _rock_salt(a: float = 5.64, cation: str = "Na", anion: str = "Cl") -> Structure:
  return Structure.from_spacegroup("Fm-3m", Lattice.cubic(a), [cation, anion],
                                   [[0, 0, 0], [0.5, 0.5, 0.5]])


def _caesium_chloride(a: float = 4.12) -> Structure:
  return Structure(Lattice.cubic(a), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def _density_by_hand(structure: Structure) -> float:
  mass = sum(float(Element(site.specie.symbol).atomic_mass) for site in structure)
  return mass * AMU_IN_GRAMS / (structure.lattice.a ** 3 * CUBIC_ANGSTROM_IN_CM3)


@pytest.fixture(scope="module")
def reference():
  structures = [_rock_salt(), _caesium_chloride()]
  return structures, generation_metrics.fingerprints(structures)


def test_identical_sets_cover_each_other(reference):
  structures, fingerprints = reference
  results = generation_metrics.generation_metrics(structures, structures, fingerprints,
                                                  generation_metrics.COVERAGE_CUTOFFS["perov_5"])
  assert results["cov_recall"] == results["cov_precision"] == 1.0
  assert results["amsd_recall"] == results["amcd_precision"] == 0.0
  assert results["cdvae_valid"] == 1.0
  assert results["wasserstein_density"] == 0.0 and results["wasserstein_num_elements"] == 0.0


def test_one_structure_type_recalls_half_and_misses_count_for_precision(reference):
  structures, fingerprints = reference
  # Rock salt slightly compressed: the same CrystalNN environment, the same composition.
  generated = [_rock_salt(5.5), None]
  results = generation_metrics.generation_metrics(generated, structures, fingerprints,
                                                  (0.2, 4.0))
  assert results["cov_recall"] == 0.5  # CsCl (8-fold) is not within 0.2 of rock salt (6-fold)
  assert results["cov_precision"] == 0.5  # the missing sample counts in the denominator
  assert results["cdvae_valid"] == 0.5


def test_wasserstein_distances_against_hand_computed_densities(reference):
  structures, fingerprints = reference
  generated = [_rock_salt(6.0), _caesium_chloride(4.5)]
  results = generation_metrics.generation_metrics(generated, structures, fingerprints,
                                                  (0.2, 4.0))
  # Two points each: W1 = mean |difference| of the sorted values.
  expected = np.mean(np.abs(np.sort([_density_by_hand(s) for s in generated])
                            - np.sort([_density_by_hand(s) for s in structures])))
  assert results["wasserstein_density"] == pytest.approx(expected, rel=1e-4)
  one_element = [Structure(Lattice.cubic(3.0), ["Cu"], [[0, 0, 0]])]
  results = generation_metrics.generation_metrics(one_element, structures, fingerprints,
                                                  (0.2, 4.0))
  assert results["wasserstein_num_elements"] == 1.0  # {1} against {2, 2}


def test_atoms_closer_than_half_an_angstrom_are_structurally_invalid(reference):
  structures, fingerprints = reference
  close = Structure(Lattice.cubic(5.0), ["Na", "Cl"], [[0, 0, 0], [0.08, 0, 0]])  # 0.4 Å
  results = generation_metrics.generation_metrics([close, _rock_salt()], structures,
                                                  fingerprints, (0.2, 4.0))
  assert results["cdvae_structure_valid"] == 0.5
  assert results["cdvae_composition_valid"] == 1.0
  assert results["cdvae_valid"] == 0.5


def test_composition_scaling_is_cdvaes_standard_scaler():
  raw = generation_metrics.composition_fingerprint(_rock_salt())
  scaled = generation_metrics.scale_composition(raw)
  means, stds = generation_metrics._COMPOSITION_MEANS, generation_metrics._COMPOSITION_STDS
  assert raw.shape == means.shape == (generation_metrics.COMPOSITION_FINGERPRINT_SIZE,)
  np.testing.assert_allclose(scaled[5], (raw[5] - means[5]) / stds[5])
  raw[3] = np.nan
  assert generation_metrics.scale_composition(raw)[3] == 0.0


def test_cutoffs_per_dataset():
  assert generation_metrics.coverage_cutoffs("perov_5") == (0.2, 4.0)
  assert generation_metrics.coverage_cutoffs("mp_20") == (0.4, 10.0)
  assert generation_metrics.coverage_cutoffs("prototypes") == (0.4, 10.0)


@pytest.mark.slow
def test_uniqueness_and_novelty_of_hand_made_duplicates():
  """Generated: rock salt, the same rock salt with its atoms moved 0.05 Å (a duplicate), a
  2x1x1 supercell of it (a duplicate), NaCl in the CsCl structure (same composition, another
  crystal), KCl (another composition) and None (no crystal, not counted). Against a training
  set holding rock-salt NaCl: unique 3 of 5, novel 2 of 5 (CsCl-type NaCl, KCl), both 2 of 5."""
  moved = _rock_salt()
  moved.perturb(0.05, min_distance=0.05)
  supercell = _rock_salt().make_supercell([2, 1, 1], in_place=False)
  nacl_as_cscl = Structure(Lattice.cubic(3.3), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
  generated = [_rock_salt(), moved, supercell, nacl_as_cscl, _rock_salt(6.29, "K"), None]
  results = generation_metrics.uniqueness_and_novelty(generated, [_rock_salt()])
  assert results == {"uniqueness": pytest.approx(3 / 5), "novelty": pytest.approx(2 / 5),
                     "unique_and_novel": pytest.approx(2 / 5)}
  # Nothing in training: every unique crystal is novel.
  alone = generation_metrics.uniqueness_and_novelty(generated, [])
  assert alone["novelty"] == 1.0 and alone["unique_and_novel"] == pytest.approx(3 / 5)
  # Per crystal, in order: which are unique and which novel.
  unique, novel = generation_metrics.unique_and_novel_flags(generated[:5], [_rock_salt()])
  assert unique.tolist() == [True, False, False, True, True]
  assert novel.tolist() == [False, False, False, True, True]
