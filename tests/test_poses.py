"""A crystal's equivalent descriptions (`poses`): the lattice's point group, each atom at the
origin, and reading a crystal in the pose a model was trained on."""

import pathlib
import warnings

import numpy as np
import pytest
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Lattice, Structure

from crystal_vae import crystals, inference, metrics, poses

PRETRAINED_UNIT_CELL = pathlib.Path(__file__).resolve().parents[1] / "pretrained" / "perov5_unit_cell"


@pytest.mark.parametrize("lattice, order", [
    (Lattice.cubic(4.0), 48),                        # m-3m
    (Lattice.tetragonal(4.0, 5.5), 16),              # 4/mmm
    (Lattice.orthorhombic(3.0, 4.0, 5.5), 8),        # mmm
    (Lattice.hexagonal(3.0, 5.0), 24),               # 6/mmm
    (Lattice.from_parameters(3.0, 4.0, 5.5, 80, 85, 95), 2),  # -1
])
def test_lattice_operations_are_the_holohedry(lattice, order):
  operations = poses.lattice_operations(lattice.matrix)
  assert len(operations) == order
  metric = lattice.matrix @ lattice.matrix.T
  for operation in operations:
    np.testing.assert_allclose(operation @ metric @ operation.T, metric, atol=1e-9)


def test_a_cubic_perovskite_has_five_descriptions_each_the_same_crystal():
  """SrTiO3 (Pm-3m): Sr or Ti at the origin, one way each; an O at the origin (site symmetry
  4/mmm, 16 of the 48 operations) three ways, its Ti-O-Ti axis along a, b or c."""
  structure = Structure(Lattice.cubic(3.905), ["Sr", "Ti", "O", "O", "O"],
                        [[0, 0, 0], [.5, .5, .5], [.5, .5, 0], [.5, 0, .5], [0, .5, .5]])
  described = poses.equivalent_poses(structure)
  assert len(described) == 5
  np.testing.assert_allclose(described[0].frac_coords, structure.frac_coords)  # as given first
  matcher = StructureMatcher(primitive_cell=False, scale=False, stol=0.01, ltol=0.001,
                             angle_tol=0.1)
  for pose in described:
    assert matcher.fit(pose, structure)
    assert np.isclose(pose.frac_coords, 0.0).all(axis=1).any()  # an atom at the origin
  # The three O-origin poses differ in the axis along which its Ti neighbour lies (at 0.5).
  ti_axes = []
  for pose in described:
    at_origin = pose[int(np.flatnonzero(np.isclose(pose.frac_coords, 0.0).all(axis=1))[0])]
    if at_origin.specie.symbol == "O":
      ti = pose.frac_coords[pose.indices_from_symbol("Ti")[0]]
      ti_axes.append(int(np.flatnonzero(np.isclose(ti, 0.5))[0]))
  assert sorted(ti_axes) == [0, 1, 2]


def test_a_model_reads_a_crystal_described_otherwise_as_in_its_dataset():
  """perov_5's GaAsO2F (validation crystal 13328: As at the corner, F on the a = 0.5 edge-face)
  with its axes turned a -> b -> c and the Ga at the origin is the same crystal, yet
  `pretrained/perov5_unit_cell` (trained unrotated) decodes that grid badly and its heat_all head
  reads it far from the dataset's own description; read in its best pose it is the dataset's."""
  model = inference.TrainedModel.restore(PRETRAINED_UNIT_CELL)
  own = Structure(Lattice.cubic(3.948617458343506), ["F", "O", "O", "As", "Ga"],
                  [[0.4996875, 0.0, 0.5], [0.4997619, 0.5, 0.0], [0.0044131, 0.5, 0.5],
                   [0.0004185, 0.0, 0.0], [0.5056678, 0.5, 0.5]])
  turned = Structure(own.lattice, own.species,
                     np.mod(own.frac_coords[:, [2, 0, 1]] - own.frac_coords[4, [2, 0, 1]], 1.0))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    assert StructureMatcher(scale=False, stol=0.05, ltol=0.01).fit(turned, own)
  described = [crystals.crystal_from_structure(s, name) for s, name in ((own, "own"), (turned, "turned"))]
  grids = model.voxelize(described)
  (own_mean, turned_mean), _ = model.encode_crystals(described)
  errors = metrics.voxel_mse(model.decode(np.stack([own_mean, turned_mean]))["density"],
                             grids["density"])
  assert errors[1] > 10 * errors[0]
  best = poses.best_pose_means(model, [turned, None, own])
  assert np.isnan(best[1]).all()
  np.testing.assert_allclose(best[2], own_mean, atol=1e-5)  # in its own setting: kept as given
  reads = model.predict_properties(np.stack([own_mean, turned_mean, best[0]]))[:, 0]
  assert abs(reads[1] - reads[0]) > 0.3
  assert abs(reads[2] - reads[0]) < 0.05
