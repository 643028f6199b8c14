"""Decoded vs true crystals: the paper's per-atom metrics, CDVAE's match rate, and figures.

Per sample (decoded and true `Atoms` in the same cube, Å, no periodicity):
* atom counts (exact / within ±2),
* nearest-atom distances true -> predicted and predicted -> true (inf when the other side has no
  atoms),
* species of the predicted atoms that lie within `species_distance` (0.5 Å) of a true atom
  against that atom's Z (exact, within ±2, Pearson correlation over the pooled pairs),
* voxel mean squared error of the density.
Over a set: rates, percentiles (50/75/90) of the pooled distances and of the per-sample voxel
MSE. The crystal-level protocol of CDVAE: `StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3)`;
the match rate counts invalid reconstructions as misses and the RMS is the mean normalised
`get_rms_dist(...)[0]` over the matches.

The plotting functions mirror the panels of the paper's Fig. 3/4 and write PNGs (matplotlib Agg).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import warnings
from collections.abc import Sequence

import numpy as np
from pymatgen.analysis.structure_matcher import FrameworkComparator, StructureMatcher
from pymatgen.core import Element, Structure
from scipy import spatial
import smact
from smact import screening

from crystal_vae.segmentation import Atoms

PERCENTILES = (50, 75, 90)


@dataclasses.dataclass(frozen=True)
class AtomComparison:
  """One sample: counts, nearest distances both ways (Å) and the (predicted Z, true Z) pairs of
  predicted atoms within `species_distance` of a true atom."""

  true_count: int
  predicted_count: int
  true_to_predicted: np.ndarray
  predicted_to_true: np.ndarray
  species_pairs: np.ndarray  # (k, 2) int: predicted Z, true Z.


def _nearest(points: np.ndarray, others: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Distance from each point to the nearest of `others` (inf if none) and its index (-1)."""
  if others.shape[0] == 0:
    return np.full(points.shape[0], np.inf), np.full(points.shape[0], -1)
  if points.shape[0] == 0:
    return np.zeros(0), np.zeros(0, np.int64)
  distance, index = spatial.cKDTree(others).query(points)
  return distance, index


def compare_atoms(predicted: Atoms, true: Atoms, species_distance: float = 0.5) -> AtomComparison:
  """Compares the decoded atoms of one sample with its true atoms."""
  true_to_predicted, _ = _nearest(true.positions, predicted.positions)
  predicted_to_true, nearest = _nearest(predicted.positions, true.positions)
  close = predicted_to_true <= species_distance
  pairs = np.stack([predicted.species[close], true.species[nearest[close]]], axis=-1)
  return AtomComparison(true_count=len(true), predicted_count=len(predicted),
                        true_to_predicted=true_to_predicted, predicted_to_true=predicted_to_true,
                        species_pairs=pairs.astype(np.int64).reshape(-1, 2))


def _percentiles(values: np.ndarray, name: str) -> dict[str, float]:
  """Percentiles without interpolation (so that inf stays inf); nan when there are no values."""
  if values.size == 0:
    return {f"{name}_p{q}": float("nan") for q in PERCENTILES}
  result = np.percentile(values, PERCENTILES, method="inverted_cdf")
  return {f"{name}_p{q}": float(value) for q, value in zip(PERCENTILES, result)}


def atom_metrics(comparisons: Sequence[AtomComparison]) -> dict[str, float]:
  """Aggregates per-sample comparisons: count rates, pooled distance percentiles, species rates
  and the Pearson correlation of predicted vs true Z (nan with fewer than 2 distinct values)."""
  true_counts = np.array([c.true_count for c in comparisons])
  predicted_counts = np.array([c.predicted_count for c in comparisons])
  count_error = np.abs(predicted_counts - true_counts)
  pairs = (np.concatenate([c.species_pairs for c in comparisons]) if comparisons
           else np.zeros((0, 2)))
  metrics = {
      "num_samples": float(len(comparisons)),
      "atom_count_exact": float(np.mean(count_error == 0)) if comparisons else float("nan"),
      "atom_count_within_2": float(np.mean(count_error <= 2)) if comparisons else float("nan"),
      "species_pairs": float(pairs.shape[0]),
  }
  for name in ("true_to_predicted", "predicted_to_true"):
    pooled = np.concatenate([getattr(c, name) for c in comparisons]) if comparisons else np.zeros(0)
    metrics.update(_percentiles(pooled, f"distance_{name}"))
  # The paper's Fig. 3 "atoms within 0.5 Å of a true atom": of the decoded atoms, pooled.
  metrics["atoms_within_0.5"] = float(np.mean(pooled <= 0.5)) if pooled.size else float("nan")
  difference = np.abs(pairs[:, 0] - pairs[:, 1])
  metrics["species_exact"] = float(np.mean(difference == 0)) if pairs.size else float("nan")
  metrics["species_within_2"] = float(np.mean(difference <= 2)) if pairs.size else float("nan")
  varied = pairs.shape[0] > 1 and np.ptp(pairs[:, 0]) > 0 and np.ptp(pairs[:, 1]) > 0
  metrics["species_correlation"] = (float(np.corrcoef(pairs[:, 0], pairs[:, 1])[0, 1])
                                    if varied else float("nan"))
  return metrics


def voxel_mse(predicted: np.ndarray, true: np.ndarray) -> np.ndarray:
  """Mean squared error per sample of density grids (B, G, G, G) -> (B,)."""
  difference = np.asarray(predicted, np.float64) - np.asarray(true, np.float64)
  return np.mean(difference.reshape(difference.shape[0], -1)**2, axis=-1)


def voxel_metrics(mse: np.ndarray) -> dict[str, float]:
  """Mean and percentiles of the per-sample voxel MSE."""
  mse = np.asarray(mse, np.float64)
  return {"voxel_mse_mean": float(mse.mean()) if mse.size else float("nan"),
          **_percentiles(mse, "voxel_mse")}


def structure_matcher() -> StructureMatcher:
  """The matcher of the CDVAE reconstruction protocol."""
  return StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3)


def structure_valid(structure: Structure, cutoff: float = 0.5) -> bool:
  """CDVAE's `structure_validity`: every interatomic distance (periodic) >= `cutoff` Å and a
  volume >= 0.1 Å³."""
  distances = structure.distance_matrix + np.diag(np.full(len(structure), cutoff + 10.0))
  return bool(distances.min() >= cutoff and structure.volume >= 0.1)


def _oxidation_states(symbol: str) -> tuple[list[int], float | None]:
  try:
    element = smact.element_dictionary((symbol,))[symbol]
  except (KeyError, NameError, ValueError):
    return [], None
  return list(element.oxidation_states or []), element.pauling_eneg


# Above this many oxidation-state combinations a composition counts as invalid without the
# search: ~10 distinct elements (e.g. a noisy prior draw whose every site has another Z) make
# billions, which CDVAE's exhaustive loop never finishes; CDVAE's own datasets need < 100.
MAX_OXIDATION_COMBINATIONS = 100_000


def smact_valid(atomic_numbers: Sequence[int], use_pauling_test: bool = True,
                include_alloys: bool = True,
                max_combinations: int = MAX_OXIDATION_COMBINATIONS) -> bool:
  """CDVAE's `smact_validity` of a composition (any multiset of atomic numbers).

  The counts are reduced by their gcd. A single element is valid; so (`include_alloys`, as in
  CDVAE) is a composition of metals only. Otherwise the composition is valid when some
  combination of the elements' SMACT oxidation states is charge neutral for the counts
  (`smact.neutral_ratios` with the counts as the only stoichiometry) and passes the Pauling
  electronegativity test (`smact.screening.pauling_test`; missing electronegativities pass).
  A composition with more than `max_combinations` combinations of oxidation states is invalid
  (not searched).
  """
  counter = collections.Counter(int(z) for z in atomic_numbers)
  if not counter:
    return False
  numbers = sorted(counter)
  symbols = [Element.from_Z(z).symbol for z in numbers]
  if len(symbols) == 1:
    return True
  if include_alloys and all(symbol in smact.metals for symbol in symbols):
    return True
  counts = np.array([counter[z] for z in numbers])
  counts = counts // np.gcd.reduce(counts)
  states, electronegativities = zip(*[_oxidation_states(symbol) for symbol in symbols])
  if math.prod(len(options) for options in states) > max_combinations:
    return False
  stoichs = [(int(count),) for count in counts]
  for oxidation in itertools.product(*states):
    if not smact.neutral_ratios(oxidation, stoichs=stoichs, threshold=int(counts.max())):
      continue
    if not use_pauling_test:
      return True
    try:
      if screening.pauling_test(oxidation, electronegativities):
        return True
    except TypeError:  # No electronegativity data: CDVAE counts it as passing.
      return True
  return False


def cdvae_valid(structure: Structure) -> bool:
  """CDVAE's validity of a crystal: SMACT-valid composition and a valid structure."""
  return smact_valid(structure.atomic_numbers) and structure_valid(structure)


@dataclasses.dataclass(frozen=True)
class MatchResult:
  """One rebuilt crystal against its true one (StructureMatcher(stol 0.5, angle_tol 10,
  ltol 0.3))."""

  rms_dist: float | None  # the normalised RMS distance of a match, None = no match
  framework: bool  # lattice and positions match with the species ignored
  cdvae_valid: bool  # the rebuilt crystal is CDVAE-valid (SMACT composition, no close atoms)

  @property
  def matched(self) -> bool:
    return self.rms_dist is not None


def match_results(predicted: Sequence[Structure | None],
                  true: Sequence[Structure]) -> list[MatchResult]:
  """`MatchResult` of each pair; None (no crystal rebuilt) is a miss."""
  matcher = structure_matcher()
  framework = StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3,
                               comparator=FrameworkComparator())
  results = []
  for prediction, target in zip(predicted, true, strict=True):
    if prediction is None:
      results.append(MatchResult(None, False, False))
      continue
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      rms = matcher.get_rms_dist(prediction, target)
      results.append(MatchResult(None if rms is None else float(rms[0]),
                                 bool(framework.fit(prediction, target)),
                                 cdvae_valid(prediction)))
  return results


def match_metrics(predicted: Sequence[Structure | None],
                  true: Sequence[Structure]) -> dict[str, float]:
  """Match rates against the true crystals (None = no crystal rebuilt = a miss):

  * `match_rate`: StructureMatcher(stol 0.5, angle_tol 10, ltol 0.3) fits (`get_rms_dist` not
    None, as CDVAE counts it), whatever the crystal;
  * `match_rate_cdvae`: CDVAE's own figure, which counts a fit only when the rebuilt crystal is
    valid (`cdvae_valid`), so even perfect reconstructions of SMACT-invalid crystals are misses:
    compare this one with published numbers;
  * `framework_match_rate`: lattice and positions match with the species ignored
    (`FrameworkComparator`), which tells geometry errors from species errors;
  * `rms_dist`: the mean normalised RMS distance of the matches; `valid_rate`."""
  return summarise_matches(match_results(predicted, true),
                           sum(p is not None for p in predicted))


def summarise_matches(results: Sequence[MatchResult], num_rebuilt: int) -> dict[str, float]:
  """`match_metrics` of per-crystal `MatchResult`s, `num_rebuilt` of them with a crystal."""
  count = len(results)
  if not count:
    return {key: float("nan") for key in ("match_rate", "match_rate_cdvae",
                                          "framework_match_rate", "rms_dist", "valid_rate")}
  distances = [r.rms_dist for r in results if r.matched]
  return {"match_rate": len(distances) / count,
          "match_rate_cdvae": sum(r.matched and r.cdvae_valid for r in results) / count,
          "framework_match_rate": sum(r.framework for r in results) / count,
          "rms_dist": float(np.mean(distances)) if distances else float("nan"),
          "valid_rate": num_rebuilt / count}


def property_metrics(predicted: np.ndarray, true: np.ndarray, names: Sequence[str],
                     training_means: Sequence[float]) -> dict[str, dict[str, float]]:
  """Per property (columns of `predicted` / `true`, NaN = no value): the number of values, MAE,
  R² = 1 - SS_res / SS_tot, and the same for the trivial baseline that predicts the training
  mean (`baseline_mae`, `baseline_r2`)."""
  results = {}
  for column, name in enumerate(names):
    known = np.isfinite(true[:, column])
    target = true[known, column].astype(np.float64)
    guess = predicted[known, column].astype(np.float64)
    baseline = np.full_like(target, training_means[column])
    total = np.sum((target - target.mean()) ** 2) if target.size else 0.0

    def r2(values, target=target, total=total):
      return float(1.0 - np.sum((target - values) ** 2) / total) if total > 0 else float("nan")

    results[name] = {
        "count": int(known.sum()),
        "mae": float(np.mean(np.abs(guess - target))) if target.size else float("nan"),
        "r2": r2(guess),
        "baseline_mae": float(np.mean(np.abs(baseline - target))) if target.size else float("nan"),
        "baseline_r2": r2(baseline),
    }
  return results
