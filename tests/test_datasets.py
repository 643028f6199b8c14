"""Tests for crystal_vae.datasets: TFDS builds from CSV, CIF folders and the prototypes."""

import csv
import gzip
import io
import os
import pathlib
import socket
import warnings

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from pymatgen.analysis.prototypes import AFLOW_PROTOTYPE_LIBRARY
from pymatgen.core import Lattice, Structure
from pymatgen.io.cif import CifParser, CifWriter

from crystal_vae import crystals
from crystal_vae import datasets

# Limits small enough that hand-made cells hit every rejection.
BOX, MAX_Z, MAX_ATOMS = 8.0, 60, 10


def _cif(structure: Structure) -> str:
  return str(CifWriter(structure))


def _good_cifs() -> dict[str, str]:
  return {
      "nacl": _cif(Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"],
                                             [[0, 0, 0], [0.5, 0.5, 0.5]])),
      "si": _cif(Structure.from_spacegroup("Fd-3m", Lattice.cubic(5.43), ["Si"], [[0, 0, 0]])),
      "lifeo": _cif(Structure(Lattice.from_parameters(3.1, 4.2, 5.3, 80, 95, 100),
                              ["Li", "O", "Fe"],
                              [[0.1, 0.2, 0.3], [0.6, 0.75, 0.05], [0.9, 0.4, 0.55]])),
      "zno": _cif(Structure(Lattice.hexagonal(3.25, 5.2), ["Zn", "Zn", "O", "O"],
                            [[1 / 3, 2 / 3, 0], [2 / 3, 1 / 3, 0.5], [1 / 3, 2 / 3, 0.38],
                             [2 / 3, 1 / 3, 0.88]])),
  }


def _bad_cifs() -> dict[str, tuple[str, str]]:
  """id -> (CIF text, expected rejection reason) under (BOX, MAX_Z, MAX_ATOMS)."""
  rng = np.random.default_rng(0)
  dummy = _cif(Structure(Lattice.cubic(4.0), ["Na"], [[0, 0, 0]])).replace(
      "  Na  Na0  1", "  X  X0  1")
  return {
      "garbage": ("this is not a CIF\n", crystals.UNPARSABLE),
      "dummy_species": (dummy, crystals.UNPARSABLE),
      "alloy": (_cif(Structure(Lattice.cubic(3.6), [{"Fe": 0.5, "Ni": 0.5}], [[0, 0, 0]])),
                crystals.DISORDERED),
      "pbtio3": (_cif(Structure(Lattice.cubic(3.9), ["Pb", "Ti", "O", "O", "O"],
                                [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5],
                                 [0, 0.5, 0.5]])), crystals.Z_ABOVE_MAX),
      "big_cu": (_cif(Structure(Lattice.cubic(9.0), ["Cu"], [[0, 0, 0]])),
                 crystals.CELL_TOO_LARGE),
      "carbon_12": (_cif(Structure(Lattice.cubic(6.0), ["C"] * 12, rng.random((12, 3)))),
                    crystals.TOO_MANY_ATOMS),
  }


def _config(name: str, path, data_dir, **overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict({
      "name": name, "path": str(path), "data_dir": str(data_dir), "split_seed": 0,
      "split_fractions": (0.8, 0.1, 0.1), "box": BOX, "max_z": MAX_Z,
      "max_atoms": MAX_ATOMS})
  config.update(overrides)
  return config


def _write_csv(path: pathlib.Path, rows: list[dict[str, str]]) -> None:
  """A CDVAE-style CSV with a leading unnamed index column."""
  text = io.StringIO()
  writer = csv.DictWriter(text, fieldnames=["", "material_id", "cif", "formula", "energy",
                                            "band_gap"])
  writer.writeheader()
  for position, row in enumerate(rows):
    writer.writerow({"": position, **row})
  if path.name.endswith(".gz"):
    with gzip.open(path, "wt", newline="") as handle:
      handle.write(text.getvalue())
  else:
    path.write_text(text.getvalue())


def _pymatgen_structure(cif_text: str) -> Structure:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return CifParser(io.StringIO(cif_text)).parse_structures(primitive=False)[0]


def _assert_matches_cif(crystal: crystals.Crystal, cif_text: str) -> None:
  reference = _pymatgen_structure(cif_text)
  np.testing.assert_allclose(crystal.lattice, reference.lattice.matrix, atol=1e-6)
  assert np.all((crystal.frac_coords >= 0) & (crystal.frac_coords < 1))
  # Same sites up to order: every (Z, position) pairs with exactly one reference site.
  reference_numbers = np.array([site.specie.Z for site in reference])
  difference = crystal.frac_coords[:, None, :] - reference.frac_coords[None, :, :]
  same_position = np.all(np.abs(difference - np.round(difference)) < 1e-6, axis=-1)
  same_site = same_position & (crystal.atomic_numbers[:, None] == reference_numbers[None, :])
  assert len(reference) == crystal.num_atoms
  assert np.all(same_site.sum(axis=0) == 1) and np.all(same_site.sum(axis=1) == 1)


def _crystals(source) -> list[crystals.Crystal]:
  return [datasets.record_to_crystal(source[i]) for i in range(len(source))]


def _rejected_rows(dataset_config) -> list[dict[str, str]]:
  path = datasets.rejected_path(datasets.make_builder(dataset_config))
  with open(path, newline="") as handle:
    return list(csv.DictReader(handle))


def test_csv_directory_keeps_good_entries_and_lists_rejections(tmp_path, capsys):
  goods, bads = _good_cifs(), _bad_cifs()
  source = tmp_path / "source"
  source.mkdir()
  train_ids = ["nacl", "garbage", "si", "dummy_species", "alloy", "pbtio3", "big_cu",
               "carbon_12", "lifeo"]
  everything = {**goods, **{k: text for k, (text, _) in bads.items()}}
  energies = {material_id: -float(i) - 0.5 for i, material_id in enumerate(everything)}
  row = lambda material_id: {"material_id": material_id, "cif": everything[material_id],
                             "formula": "AB", "energy": energies[material_id],
                             "band_gap": "1.25" if material_id == "si" else ""}
  _write_csv(source / "train.csv", [row(i) for i in train_ids])
  _write_csv(source / "val.csv.gz", [row("zno")])
  config = _config("csv", source, tmp_path / "tfds")

  sources = datasets.load_data_sources(config)

  assert set(sources) == {"train", "validation"}  # No test.csv: no test split.
  train = _crystals(sources["train"])
  assert [c.id for c in train] == ["nacl", "si", "lifeo"]  # Source order, bad rows skipped.
  assert [c.id for c in _crystals(sources["validation"])] == ["zno"]
  for crystal in train + _crystals(sources["validation"]):
    _assert_matches_cif(crystal, goods[crystal.id])
    expected = {"energy": energies[crystal.id]}
    if crystal.id == "si":
      expected["band_gap"] = 1.25
    assert crystal.properties == expected
  rejected = _rejected_rows(config)
  assert {(r["split"], r["id"], r["reason"]) for r in rejected} == {
      ("train", material_id, reason) for material_id, (_, reason) in bads.items()}
  by_id = {r["id"]: r for r in rejected}
  assert by_id["garbage"]["source"] == f"{source / 'train.csv'}:row 2"
  assert all(r["detail"] for r in rejected)
  printed = capsys.readouterr().out
  assert ("train: kept 3, skipped 6 (unparsable_cif=2, disordered=1, z_above_max=1, "
          "cell_too_large=1, too_many_atoms=1)") in printed
  assert "validation: kept 1, skipped 0" in printed
  assert datasets.build_summary(datasets.make_builder(config)) == [
      line.split(": ", 1)[1] for line in printed.splitlines() if line.startswith("crystal_")]


def test_cif_directory_splits_all_files_and_rejects_bad_ones(tmp_path):
  goods, bads = _good_cifs(), _bad_cifs()
  source = tmp_path / "cifs"
  source.mkdir()
  for name, text in goods.items():
    (source / f"{name}.cif").write_text(text)
  for name, (text, _) in bads.items():
    (source / f"{name}.cif").write_text(text)
  (source / "binary.cif").write_bytes(b"\xff\xfe\x00not utf-8")
  (source / "notes.txt").write_text("not a crystal")
  config = _config("cif_dir", source, tmp_path / "tfds", split_fractions=(0.5, 0.25, 0.25))

  sources = datasets.load_data_sources(config)

  kept = {split: [c.id for c in _crystals(s)] for split, s in sources.items()}
  all_kept = [i for ids in kept.values() for i in ids]
  assert sorted(all_kept) == sorted(goods)
  for split_source in sources.values():
    for crystal in _crystals(split_source):
      _assert_matches_cif(crystal, goods[crystal.id])
      assert crystal.properties == {}
  rejected = {r["id"]: r for r in _rejected_rows(config)}
  assert {i: r["reason"] for i, r in rejected.items()} == {
      **{i: reason for i, (_, reason) in bads.items()}, "binary": crystals.UNPARSABLE}
  assert rejected["big_cu"]["source"] == str(source / "big_cu.cif")
  # Splits partition the 11 files, kept or not; boundaries round(11 * (0.5, 0.75)) = 6, 8.
  by_split = {split: [] for split in datasets.SPLITS}
  for split, ids in kept.items():
    by_split[split] += ids
  for row in rejected.values():
    by_split[row["split"]].append(row["id"])
  assert [len(by_split[split]) for split in datasets.SPLITS] == [6, 2, 3]


def test_structure_sources_reject_empty_structures(tmp_path, monkeypatch):
  entries = [
      datasets._Entry(id="empty", source="test[0]", structure=Structure(Lattice.cubic(3), [], [])),
      datasets._Entry(id="cscl", source="test[1]",
                      structure=Structure(Lattice.cubic(4.1), ["Cs", "Cl"],
                                          [[0, 0, 0], [0.5, 0.5, 0.5]])),
  ]
  monkeypatch.setattr(datasets, "_prototype_entries", lambda: entries)
  config = _config("prototypes", "", tmp_path / "tfds", max_z=100,
                   split_fractions=(1.0, 0.0, 0.0))

  sources = datasets.load_data_sources(config)

  assert set(sources) == {"train"}
  assert [c.id for c in _crystals(sources["train"])] == ["cscl"]
  assert [(r["id"], r["reason"], r["source"]) for r in _rejected_rows(config)] == [
      ("empty", crystals.NO_ATOMS, "test[0]")]


def _single_csv_dir(tmp_path) -> pathlib.Path:
  source = tmp_path / "single"
  source.mkdir()
  rows = [{"material_id": f"fe-{i}", "energy": str(i), "formula": "Fe", "band_gap": "",
           "cif": _cif(Structure(Lattice.cubic(2.5 + 0.1 * i), ["Fe"], [[0, 0, 0]]))}
          for i in range(20)]
  _write_csv(source / "all.csv.gz", rows)
  return source


def _split_ids(config) -> dict[str, list[str]]:
  return {split: [c.id for c in _crystals(s)]
          for split, s in datasets.load_data_sources(config).items()}


def test_single_csv_gets_a_deterministic_seeded_split(tmp_path):
  source = _single_csv_dir(tmp_path)
  splits = _split_ids(_config("csv", source, tmp_path / "a"))
  again = _split_ids(_config("csv", source, tmp_path / "b"))
  reseeded = _split_ids(_config("csv", source, tmp_path / "a", split_seed=1))

  assert splits == again
  assert splits != reseeded
  for split_ids in (splits, reseeded):
    assert [len(split_ids[s]) for s in datasets.SPLITS] == [16, 2, 2]
    all_ids = [i for s in datasets.SPLITS for i in split_ids[s]]
    assert sorted(all_ids) == sorted(f"fe-{i}" for i in range(20))  # Disjoint and covering.
    for ids in split_ids.values():  # Source order within a split.
      assert ids == sorted(ids, key=lambda i: int(i.split("-")[1]))


def test_limits_path_and_split_settings_name_the_build(tmp_path):
  source = _single_csv_dir(tmp_path)
  default = ml_collections.ConfigDict({"name": "perov_5", "path": "", "data_dir": ""})
  assert datasets.builder_config(default) is datasets.CrystalDataset.builder_configs["perov_5"]

  names = {
      datasets.builder_config(_config("perov_5", "", "", box=10.0, max_z=100,
                                      max_atoms=64)).name,
      datasets.builder_config(_config("perov_5", "", "")).name,
      datasets.builder_config(_config("perov_5", "", "", max_atoms=12)).name,
      datasets.builder_config(_config("perov_5", "", "", split_seed=3)).name,
      datasets.builder_config(_config("perov_5", source, "")).name,
  }
  assert names == {"perov_5", "perov_5-box8-z60-n10", "perov_5-box8-z60-n12",
                   "perov_5-box8-z60-n10-split3-0.8-0.1-0.1",
                   f"perov_5-box8-z60-n10-p{datasets._directory_fingerprint(source)}"}
  with_path = datasets.builder_config(_config("csv", source, "")).name
  (source / "all.csv.gz").write_bytes((source / "all.csv.gz").read_bytes() + b"\n")
  assert datasets.builder_config(_config("csv", source, "")).name != with_path


def test_named_cdvae_config_downloads_the_three_splits(tmp_path, monkeypatch):
  goods = _good_cifs()
  local = {}
  for stem, material_id in (("train", "nacl"), ("val", "si"), ("test", "zno")):
    local[stem] = tmp_path / f"{stem}.csv"
    _write_csv(local[stem], [{"material_id": material_id, "cif": goods[material_id],
                              "formula": "", "energy": "1", "band_gap": ""}])
  requested = []

  def fake_download(self, urls):
    del self
    requested.extend(urls.values())
    return {split: local[url.split("/")[-1].removesuffix(".csv")]
            for split, url in urls.items()}

  monkeypatch.setattr(tfds.download.DownloadManager, "download", fake_download)
  # The host answers (the build first checks that it can be reached, to fail at once offline).
  monkeypatch.setattr(datasets.socket, "create_connection",
                      lambda *args, **kwargs: socket.socket())

  sources = datasets.load_data_sources(_config("carbon_24", "", tmp_path / "tfds"))

  assert sorted(requested) == sorted(
      f"https://raw.githubusercontent.com/txie-93/cdvae/main/data/carbon_24/{stem}.csv"
      for stem in ("train", "val", "test"))
  assert {split: [c.id for c in _crystals(s)] for split, s in sources.items()} == {
      "train": ["nacl"], "validation": ["si"], "test": ["zno"]}


def test_prototypes_keep_exactly_the_structures_within_default_limits(tmp_path):
  limits = crystals.CrystalLimits()
  expected = 0
  for prototype in AFLOW_PROTOTYPE_LIBRARY:
    structure = prototype["snl"].structure
    expected += (structure.is_ordered and 0 < len(structure) <= limits.max_atoms
                 and max(structure.lattice.abc) < limits.box
                 and max(site.specie.Z for site in structure) <= limits.max_z)
  assert expected == 243
  config = ml_collections.ConfigDict({"name": "prototypes", "data_dir": str(tmp_path)})

  sources = datasets.load_data_sources(config)

  kept = [c for s in sources.values() for c in _crystals(s)]
  assert len(kept) == expected
  assert len({c.id for c in kept}) == expected
  labels = {p["tags"]["aflow"] for p in AFLOW_PROTOTYPE_LIBRARY}
  assert all(c.id in labels or c.id.rsplit("-", 1)[0] in labels for c in kept)
  rejected = _rejected_rows(config)
  assert len(rejected) == len(AFLOW_PROTOTYPE_LIBRARY) - expected
  assert os.path.dirname(datasets.rejected_path(datasets.make_builder(config))).endswith(
      os.path.join("crystal_dataset", "prototypes", str(datasets.CrystalDataset.VERSION)))
