"""CDVAE's generation metrics, computed as CDVAE's `scripts/compute_metrics.py` computes them.

Xie et al., "Crystal Diffusion Variational Autoencoder for Periodic Material Generation" (ICLR
2022), github.com/txie-93/cdvae (MIT licence), `GenEval`:

* validity over ALL generated samples: structural (every periodic interatomic distance >= 0.5 Å
  and volume >= 0.1 Å³, `metrics.structure_valid`), compositional (SMACT charge neutrality and
  electronegativity, `metrics.smact_valid`), and both; a sample that gave no crystal is invalid;
* coverage against a reference set (CDVAE: the test split) with two fingerprints per crystal:
  the mean over sites of matminer's `CrystalNNFingerprint.from_preset("ops")` (61 numbers) and
  matminer's `ElementProperty.from_preset("magpie")` of the composition (132 numbers, scaled by
  CDVAE's fixed `CompScalerMeans` / `CompScalerStds`, NaN -> 0). A reference crystal is
  recalled (COV-R) when some sample lies within BOTH cutoffs of it (Euclidean distance of the
  structure and of the scaled composition fingerprints); a sample is precise (COV-P) when it lies
  within both cutoffs of some reference crystal, divided by the number of samples generated
  (those without a crystal or fingerprint count as misses). Cutoffs: perov_5 and carbon_24
  0.2 / 4, mp_20 0.4 / 10 (`COVERAGE_CUTOFFS`);
* Wasserstein distances (scipy) between the valid samples and the reference crystals of the
  density (g/cm³) and of the number of distinct elements (CDVAE draws 1,000 of its 10,000
  samples' valid ones; here every valid sample is used).

Beyond CDVAE, so that coverage bought by memorising shows (`uniqueness_and_novelty`): among the
valid samples, the fraction that match no earlier sample (uniqueness) and the fraction that
match no training crystal (novelty), matched with CDVAE's `StructureMatcher(stol=0.5,
angle_tol=10, ltol=0.3)` (looser than pymatgen's defaults, so fewer samples count as new).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

import numpy as np
from pymatgen.core import Structure
from scipy import spatial, stats

from crystal_vae import metrics
from crystal_vae import progress

# pymatgen's StructureMatcher compares only crystals of the same reduced composition (its
# species comparator); matching is done within groups of the same reduced formula.

# (structure fingerprint cutoff, composition fingerprint cutoff), CDVAE's `COV_Cutoffs`.
COVERAGE_CUTOFFS = {"perov_5": (0.2, 4.0), "carbon_24": (0.2, 4.0), "mp_20": (0.4, 10.0)}
# Datasets CDVAE never used (the prototypes, a CSV, a folder of CIFs) are general inorganic
# crystals: Materials Project's cutoffs.
DEFAULT_CUTOFFS = COVERAGE_CUTOFFS["mp_20"]
STRUCTURE_FINGERPRINT_SIZE = 61
COMPOSITION_FINGERPRINT_SIZE = 132

# CDVAE's `cdvae/common/constants.py` (CompScalerMeans, CompScalerStds): the scaling of the
# magpie composition fingerprint behind its composition cutoffs.
_COMPOSITION_MEANS = np.array([
    21.194441759304013, 58.20212663122281, 37.0076848719188, 36.52738520455582, 13.350626389725019,
    29.468922184630255, 28.71735137747704, 78.8868535524408, 50.16950217496375, 59.56764743604155,
    19.020429484306277, 61.335572740454325, 47.14515893344343, 141.75135923307818,
    94.60620029962553, 85.95794070476977, 34.07300576173523, 68.06189371516912, 637.9862061297893,
    1817.2394155466848, 1179.2532094169414, 1127.2743149568837, 431.51034284549826,
    909.1060025135899, 3.7744320927984534, 13.673707104881585, 9.899275012083132,
    9.620186927095652, 3.8426065581251856, 9.96950217496375, 3.305461575640406, 5.483035282745288,
    2.1775737071048815, 4.215114560306594, 0.8206087101824266, 3.732092798453359,
    109.16732721121315, 179.5570323827936, 70.38970517158047, 136.0978305229613,
    27.027545809538527, 119.16713388110198, 1.2721433060967857, 2.4614001837260617,
    1.1892568776289631, 1.9844483610247092, 0.4691462290494881, 2.100143582306204,
    1.4829869502174964, 1.9899951667472209, 0.5070082165297245, 1.7956250375970633,
    0.2056251946617602, 1.745867568873852, 0.05650072498791687, 2.3618656355727405,
    2.3053649105848235, 1.2829636137262992, 0.9995555685850794, 1.5150314161430642,
    0.7731271145480909, 7.4648139197680035, 6.691686805219913, 4.010677272036105,
    2.612307566507693, 3.303528274528758, 0.2739487675205413, 5.889753504108265, 5.615804736587724,
    2.3244356612494683, 2.1426251769710905, 1.4464475592073465, 4.739246012566457,
    14.578395360077332, 9.839149347510874, 9.413701584608935, 3.537059747455868, 8.550410826486225,
    0.008119864668922184, 0.43286611889801835, 0.4247462542290962, 0.16687837041055423,
    0.17139889490813626, 0.10898985016916385, 0.06283228612856452, 2.6573707104881583,
    2.594538424359594, 1.219602938224228, 1.0596390454742999, 1.1120831319478008,
    0.14842919284678588, 3.8473658772353794, 3.6989366843885936, 1.4541605082183982,
    1.3862277372859781, 0.8018849685838569, 0.03542774287095215, 2.4474625422909617,
    2.4120347994200095, 0.7745217539010397, 0.9145812330586208, 0.3198646689221846,
    1.552730787820203, 6.910681488641856, 5.357950700821653, 3.615163570754227, 1.9072256165179793,
    2.6702271628806185, 14.608536589568727, 34.83222477045747, 20.223688180890715,
    22.47901710732293, 7.17674504190757, 18.641837024143584, 0.009066988883518605,
    0.9185191396809959, 0.9094521507974755, 0.4368550481994018, 0.38905942883427047,
    0.48375558240695804, 0.0012985909686158003, 0.21708593995837092, 0.21578734898975546,
    0.08167977375391729, 0.08155386250705281, 0.06036340747305611, 116.32010633156113,
    217.5905751570807, 101.27046882551957, 162.87154200548844, 41.920624308665566,
    136.4664572257129,
])

_COMPOSITION_STDS = np.array([
    16.35781741152948, 20.189540126474725, 20.516298414514758, 16.816765336550194,
    7.966591328222124, 22.270791076753067, 21.802116630115243, 12.804546460581966,
    24.756629388687983, 13.930306216047477, 10.214535652334533, 27.801612936980938,
    39.74031558353379, 54.269739685575814, 53.70466607591569, 42.852342044453444,
    20.78341194242935, 56.28783510219931, 563.8004405882157, 732.0722574247563, 736.2122907972664,
    606.351603075103, 272.62646060896407, 810.6156779688841, 3.0362262146833428,
    3.2075174256751606, 4.0633818989245665, 2.9738244769894764, 1.7805586029644034,
    5.643243225066782, 1.1994336274579853, 0.8939013979423364, 1.2297581799896975,
    1.0066021334519983, 0.49129747526397105, 1.4159553146070951, 31.754756468836774,
    28.054241463256226, 38.16336054795611, 25.83485338379922, 15.388376641904662,
    39.67137484594156, 0.31988340032011076, 0.6833658037760536, 0.7464197945553585,
    0.4881349085029781, 0.3176591553643101, 0.8601748146737138, 0.5864801661863596,
    0.10048913710210677, 0.5836289120986499, 0.2811748167435902, 0.2468696279341553,
    0.5007375747433073, 0.37237566669029587, 1.7235989187720187, 1.7058836077743305,
    1.1558859351244697, 0.7677842566598179, 1.9203550253462733, 2.1289400248865182,
    3.5326064169848332, 3.708508303762512, 2.8709941136664567, 1.6110681295257014,
    4.310192504023775, 1.6644182118209292, 6.228287671164213, 6.1200848808512305,
    3.1986202996110302, 2.4492978142248867, 4.030497343977163, 3.662028270049814,
    6.8192125550358345, 6.614243783887738, 4.334987449618594, 2.568319610320196,
    5.9494890200106925, 0.08974370432893491, 0.4954725441517777, 0.494304434278516,
    0.2309340434963803, 0.2072873961103969, 0.31162647950590266, 0.39805702757060923,
    1.8111691089355726, 1.7973395144505941, 0.9486995373104102, 0.7538753151875139,
    1.5233177017753785, 0.7952606701778913, 3.711190225170556, 3.638721437232604,
    1.7171165424006831, 1.4307904413917036, 2.1047820817622904, 0.49193748323158065,
    4.064840532426175, 4.035286619587313, 1.4858577214526643, 1.5799117659864677,
    1.6130080156145745, 1.555249156140194, 4.776932951077492, 4.569790780459629, 2.224617778217326,
    1.7217507416156546, 2.5969733650703763, 7.215001918238936, 19.252513469778584,
    18.775394044177858, 9.447222764774764, 6.7467931836261235, 11.106825644766616,
    0.27206794253092115, 1.6449321034573106, 1.6236282792648686, 0.8506917026741503,
    0.7020945355184042, 1.2281895279350408, 0.04134438177238229, 0.5508855867341717,
    0.5486095551438679, 0.24239297524046477, 0.2127779137935831, 0.3036750942874694,
    80.06063945615361, 21.345794811194104, 80.16475677581042, 52.58533928558554, 35.40836791039412,
    85.980205895116,
])



def coverage_cutoffs(dataset_name: str) -> tuple[float, float]:
  """CDVAE's (structure, composition) coverage cutoffs for a dataset, Materials Project's for
  datasets CDVAE did not use."""
  return COVERAGE_CUTOFFS.get(dataset_name, DEFAULT_CUTOFFS)


@functools.cache
def _featurizers():
  # Imported here: matminer takes seconds to import and only these metrics need it.
  # pylint: disable=g-import-not-at-top
  from matminer.featurizers.composition.composite import ElementProperty
  from matminer.featurizers.site.fingerprint import CrystalNNFingerprint
  return CrystalNNFingerprint.from_preset("ops"), ElementProperty.from_preset("magpie")


def structure_fingerprint(structure: Structure) -> np.ndarray | None:
  """CDVAE's structure fingerprint: the mean over sites of the CrystalNN "ops" site fingerprint
  (61 numbers); None where CrystalNN fails (CDVAE then counts the crystal invalid)."""
  site_featurizer, _ = _featurizers()
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      sites = [site_featurizer.featurize(structure, index) for index in range(len(structure))]
  except Exception:  # pylint: disable=broad-except  (CDVAE's own rule: any failure)
    return None
  return np.asarray(sites, np.float64).mean(axis=0)


def composition_fingerprint(structure: Structure) -> np.ndarray:
  """The magpie composition fingerprint (132 numbers), unscaled."""
  _, composition_featurizer = _featurizers()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return np.asarray(composition_featurizer.featurize(structure.composition), np.float64)


def scale_composition(fingerprints: np.ndarray) -> np.ndarray:
  """CDVAE's `CompScaler.transform`: (x - mean) / std with CDVAE's constants, NaN -> 0."""
  scaled = (np.asarray(fingerprints, np.float64) - _COMPOSITION_MEANS) / _COMPOSITION_STDS
  return np.where(np.isnan(scaled), 0.0, scaled)


def fingerprints(structures: Sequence[Structure | None]) -> tuple[np.ndarray, np.ndarray]:
  """Structure (N, 61) and scaled composition (N, 132) fingerprints; rows of NaN for a missing
  crystal or one whose structure fingerprint fails (both rows, as CDVAE drops both)."""
  structure_rows = np.full((len(structures), STRUCTURE_FINGERPRINT_SIZE), np.nan)
  composition_rows = np.full((len(structures), COMPOSITION_FINGERPRINT_SIZE), np.nan)
  counter = progress.Progress("fingerprints (CrystalNN, Magpie):", len(structures))
  for row, structure in enumerate(structures):
    counter.advance()
    if structure is None:
      continue
    fingerprint = structure_fingerprint(structure)
    if fingerprint is None:
      continue
    structure_rows[row] = fingerprint
    composition_rows[row] = scale_composition(composition_fingerprint(structure))
  return structure_rows, composition_rows


def coverage(generated: tuple[np.ndarray, np.ndarray], reference: tuple[np.ndarray, np.ndarray],
             cutoffs: tuple[float, float]) -> dict[str, float]:
  """CDVAE's `compute_cov`: COV-R, COV-P and the mean nearest fingerprint distances (AMSD /
  AMCD) both ways. Each argument is a (structure, scaled composition) fingerprint pair as from
  `fingerprints`; generated rows of NaN are misses counted in COV-P's denominator."""
  generated_structure, generated_composition = generated
  reference_structure, reference_composition = reference
  num_generated = len(generated_structure)
  kept = ~np.isnan(generated_structure).any(axis=1)
  if not kept.any() or not len(reference_structure):
    return {"cov_recall": 0.0, "cov_precision": 0.0, "amsd_recall": float("nan"),
            "amsd_precision": float("nan"), "amcd_recall": float("nan"),
            "amcd_precision": float("nan")}
  structure_distance = spatial.distance.cdist(generated_structure[kept], reference_structure)
  composition_distance = spatial.distance.cdist(generated_composition[kept],
                                                reference_composition)
  structure_cutoff, composition_cutoff = cutoffs
  return {
      "cov_recall": float(np.mean(
          (structure_distance.min(axis=0) <= structure_cutoff)
          & (composition_distance.min(axis=0) <= composition_cutoff))),
      "cov_precision": float(np.sum(
          (structure_distance.min(axis=1) <= structure_cutoff)
          & (composition_distance.min(axis=1) <= composition_cutoff)) / num_generated),
      "amsd_recall": float(structure_distance.min(axis=0).mean()),
      "amsd_precision": float(structure_distance.min(axis=1).mean()),
      "amcd_recall": float(composition_distance.min(axis=0).mean()),
      "amcd_precision": float(composition_distance.min(axis=1).mean()),
  }


def generation_metrics(generated: Sequence[Structure | None], reference: Sequence[Structure],
                       reference_fingerprints: tuple[np.ndarray, np.ndarray],
                       cutoffs: tuple[float, float]) -> dict[str, float]:
  """Every metric of the module docstring for generated crystals (None = no crystal) against
  the reference crystals and their `fingerprints`."""
  num = len(generated)
  built = [s for s in generated if s is not None]
  structure_ok = [metrics.structure_valid(s) for s in built]
  composition_ok = [metrics.smact_valid(s.atomic_numbers) for s in built]
  generated_fingerprints = fingerprints(generated)
  has_fingerprint = ~np.isnan(generated_fingerprints[0]).any(axis=1)[
      [s is not None for s in generated]]
  valid = [s for s, ok_s, ok_c, ok_f in zip(built, structure_ok, composition_ok, has_fingerprint)
           if ok_s and ok_c and ok_f]
  results = {
      "cdvae_structure_valid": sum(structure_ok) / num if num else float("nan"),
      "cdvae_composition_valid": sum(composition_ok) / num if num else float("nan"),
      "cdvae_valid": len(valid) / num if num else float("nan"),
      **coverage(generated_fingerprints, reference_fingerprints, cutoffs),
  }
  if valid and reference:
    results["wasserstein_density"] = float(stats.wasserstein_distance(
        [s.density for s in valid], [s.density for s in reference]))
    results["wasserstein_num_elements"] = float(stats.wasserstein_distance(
        [len(s.composition.elements) for s in valid],
        [len(s.composition.elements) for s in reference]))
  else:
    results["wasserstein_density"] = results["wasserstein_num_elements"] = float("nan")
  return results


def _formula(structure: Structure) -> str:
  return structure.composition.reduced_formula


def unique_and_novel_flags(generated: Sequence[Structure], training: Sequence[Structure]
                           ) -> tuple[np.ndarray, np.ndarray]:
  """For each generated crystal, with CDVAE's StructureMatcher: whether no earlier one matches
  it (unique) and whether no training crystal matches it (novel)."""
  matcher = metrics.structure_matcher()
  known: dict[str, list[Structure]] = {}
  for structure in training:
    known.setdefault(_formula(structure), []).append(structure)
  seen: dict[str, list[Structure]] = {}
  unique, novel = [], []
  counter = progress.Progress("uniqueness and novelty:", len(generated))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for structure in generated:
      formula = _formula(structure)
      unique.append(not any(matcher.fit(structure, other) for other in seen.get(formula, ())))
      novel.append(not any(matcher.fit(structure, other) for other in known.get(formula, ())))
      seen.setdefault(formula, []).append(structure)
      counter.advance()
  return np.array(unique, bool), np.array(novel, bool)


def uniqueness_and_novelty(generated: Sequence[Structure | None],
                           training: Sequence[Structure]) -> dict[str, float]:
  """Among the generated crystals that are not None: the fraction that match no earlier one
  (`uniqueness`), the fraction that match no training crystal (`novelty`) and the fraction that
  are both (`unique_and_novel`), with CDVAE's StructureMatcher."""
  built = [s for s in generated if s is not None]
  if not built:
    return {"uniqueness": float("nan"), "novelty": float("nan"),
            "unique_and_novel": float("nan")}
  unique, novel = unique_and_novel_flags(built, training)
  return {"uniqueness": float(unique.mean()), "novelty": float(novel.mean()),
          "unique_and_novel": float((unique & novel).mean())}
