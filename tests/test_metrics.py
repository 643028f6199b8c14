"""Metrics against hand-made cases with known distances, counts and correlations."""

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from crystal_vae import metrics
from crystal_vae.segmentation import Atoms


def _atoms(species, positions) -> Atoms:
  species = np.asarray(species, np.int32)
  return Atoms(species=species, positions=np.asarray(positions, np.float64).reshape(-1, 3),
               voxels=np.ones(species.shape[0], np.int64),
               on_boundary=np.zeros(species.shape[0], bool))


def test_compare_atoms_distances_and_species_pairs():
  true = _atoms([8, 22, 38], [[1, 1, 1], [5, 5, 5], [8, 8, 8]])
  # One predicted atom 0.3 Å off the O, one 0.4 Å off the Ti with the wrong Z, one 2 Å away
  # from anything true: 3 true and 3 predicted atoms.
  predicted = _atoms([8, 23, 30], [[1.3, 1, 1], [5, 5, 5.4], [5, 8, 8]])
  comparison = metrics.compare_atoms(predicted, true)
  np.testing.assert_allclose(comparison.true_to_predicted, [0.3, 0.4, 3.0])
  np.testing.assert_allclose(comparison.predicted_to_true, [0.3, 0.4, 3.0])
  assert comparison.species_pairs.tolist() == [[8, 8], [23, 22]]
  assert (comparison.true_count, comparison.predicted_count) == (3, 3)


def test_empty_prediction_has_infinite_distances():
  true = _atoms([8], [[1, 1, 1]])
  comparison = metrics.compare_atoms(_atoms([], []), true)
  assert comparison.true_to_predicted.tolist() == [np.inf]
  assert comparison.predicted_to_true.size == 0
  assert comparison.species_pairs.shape == (0, 2)


def test_atom_metrics_counts_percentiles_and_correlation():
  true = _atoms([1, 2, 3, 4], [[0, 0, 0], [2, 0, 0], [4, 0, 0], [6, 0, 0]])
  # Sample 1: exact count, distances 0.1, 0.2, 0.3, 0.4 and Z = true Z + (0, 0, 1, 3).
  first = _atoms([1, 2, 4, 7], [[0.1, 0, 0], [2.2, 0, 0], [4.3, 0, 0], [6.4, 0, 0]])
  # Sample 2: two atoms too few; sample 3: three too many (far away atoms).
  second = _atoms([1, 2], [[0, 0, 0], [2, 0, 0]])
  third = _atoms([1, 2, 3, 4, 9, 9, 9],
                 [[0, 0, 0], [2, 0, 0], [4, 0, 0], [6, 0, 0], [0, 9, 0], [0, 0, 9], [9, 9, 9]])
  comparisons = [metrics.compare_atoms(p, true) for p in (first, second, third)]
  result = metrics.atom_metrics(comparisons)
  assert result["atom_count_exact"] == pytest.approx(1 / 3)
  assert result["atom_count_within_2"] == pytest.approx(2 / 3)
  # Pooled true -> predicted distances: [.1,.2,.3,.4] + [0,0,2,4] + [0,0,0,0] (12 values).
  pooled = np.array([.1, .2, .3, .4, 0, 0, 2, 4, 0, 0, 0, 0])
  for q in metrics.PERCENTILES:
    assert result[f"distance_true_to_predicted_p{q}"] == pytest.approx(
        np.percentile(pooled, q, method="inverted_cdf"))
  # Pairs: first 4 (0.1..0.4 Å, all within 0.5), second 2, third 4 exact.
  predicted_z = np.array([1, 2, 4, 7, 1, 2, 1, 2, 3, 4])
  true_z = np.array([1, 2, 3, 4, 1, 2, 1, 2, 3, 4])
  assert result["species_pairs"] == 10
  assert result["species_exact"] == pytest.approx(8 / 10)
  assert result["species_within_2"] == pytest.approx(9 / 10)
  assert result["species_correlation"] == pytest.approx(np.corrcoef(predicted_z, true_z)[0, 1])


def test_voxel_mse_and_percentiles():
  true = np.zeros((3, 2, 2, 2))
  predicted = np.stack([np.full((2, 2, 2), v) for v in (1.0, 2.0, 3.0)])
  mse = metrics.voxel_mse(predicted, true)
  np.testing.assert_allclose(mse, [1.0, 4.0, 9.0])
  result = metrics.voxel_metrics(mse)
  assert result["voxel_mse_mean"] == pytest.approx(14 / 3)
  assert result["voxel_mse_p50"] == 4.0 and result["voxel_mse_p90"] == 9.0


def test_match_metrics_counts_invalid_as_misses():
  a = 4.12
  caesium_chloride = Structure(Lattice.cubic(a), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
  perturbed = caesium_chloride.copy()
  perturbed.translate_sites([0], [0.02, 0, 0])  # Cs moved by 0.02 a along x
  wrong = Structure.from_spacegroup("Fm-3m", Lattice.cubic(7.0), ["Cs", "Cl"],
                                    [[0, 0, 0], [0.5, 0.5, 0.5]])  # the rock-salt structure
  relabelled = caesium_chloride.copy()
  relabelled.replace_species({"Cs": "Rb", "Cl": "Br"})
  result = metrics.match_metrics([caesium_chloride, perturbed, wrong, None, relabelled],
                                 [caesium_chloride] * 5)
  assert result["match_rate"] == pytest.approx(2 / 5)
  assert result["framework_match_rate"] == pytest.approx(3 / 5)
  assert result["valid_rate"] == pytest.approx(4 / 5)
  # By hand: the two sites' displacements about their mean are ±0.01 a, so the RMS is 0.01 a,
  # normalised by the length per site (V / 2)^(1/3); averaged with the exact match's 0.
  expected = 0.01 * a / (a ** 3 / 2) ** (1 / 3)
  assert result["rms_dist"] == pytest.approx(expected / 2, rel=1e-6)


def test_cdvae_match_rate_counts_only_valid_reconstructions():
  rocksalt = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"],
                                       [[0, 0, 0], [0.5, 0.5, 0.5]])
  # Fluorite geometry with Na and Cl: NaCl2 has no charge-neutral oxidation states (SMACT).
  sodium_chloride_2 = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.5), ["Na", "Cl"],
                                                [[0, 0, 0], [0.25, 0.25, 0.25]])
  # Two atoms 0.4 Å apart through the cell's face: structurally invalid.
  overlapping = Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0.05, 0, 0], [0.95, 0, 0]])
  assert not metrics.smact_valid(sodium_chloride_2.atomic_numbers)
  assert metrics.smact_valid(overlapping.atomic_numbers)
  assert not metrics.structure_valid(overlapping)
  assert metrics.structure_valid(rocksalt) and metrics.cdvae_valid(rocksalt)
  truths = [rocksalt, sodium_chloride_2, overlapping]
  result = metrics.match_metrics(truths, truths)  # perfect reconstructions
  assert result["match_rate"] == 1.0
  assert result["match_rate_cdvae"] == pytest.approx(1 / 3)


def test_structure_validity_by_hand():
  # 0.5 Å apart exactly is valid, below is not; a 0.05 Å³ cell is not.
  assert metrics.structure_valid(Structure(Lattice.cubic(4.0), ["C", "C"],
                                           [[0, 0, 0], [0.125, 0, 0]]))
  assert not metrics.structure_valid(Structure(Lattice.cubic(4.0), ["C", "C"],
                                               [[0, 0, 0], [0.12, 0, 0]]))
  assert not metrics.structure_valid(Structure(Lattice.cubic(0.35), ["H"], [[0, 0, 0]]))
