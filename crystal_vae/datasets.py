"""Crystal datasets as TFDS ArrayRecord builds, read without TensorFlow.

One builder, `CrystalDataset`, turns a crystal source into the splits `train`, `validation`
and `test` (only those that end up with crystals). Sources, by `name`:

- `prototypes`: the 288 AFLOW prototypes that ship with pymatgen (no network, no files).
- `perov_5`: the CDVAE perov_5 CSVs; with an empty `path` the train and validation splits that
  ship inside the package (`crystal_vae/data/perov_5`, no network), else the directory `path`.
- `carbon_24`, `mp_20`: the CDVAE benchmark CSVs, downloaded from the CDVAE repository when
  `path` is empty (one try: offline it fails at once), read from the directory `path` otherwise.
- `csv`: a directory of CDVAE-style CSVs (`material_id`, `cif` and numeric property columns).
- `cif_dir`: a directory of `.cif` files; the id of a crystal is its file name.

A CSV directory holding `train.csv`, `val.csv` (or `validation.csv`) and `test.csv` (each
optionally gzipped) keeps those splits. A split whose file is absent, or none of whose entries
passes the limits, is absent from the build (and from `load_data_sources`).
A source with a single list of crystals (`prototypes`, `cif_dir`, a directory with exactly one
CSV) is split by a seeded permutation into `split_fractions` of its entries; each split keeps
the source order. The split is decided before parsing, so it does not depend on the limits.

Every entry goes through `crystals.crystal_from_cif` / `crystal_from_structure` with the
configured `CrystalLimits`. Entries that fail are skipped and listed in `rejected.csv`
(`split,id,reason,detail,source`) in the build directory
`<data_dir>/crystal_dataset/<config name>/<version>/`; the build prints and logs
`kept / skipped-by-reason` per split. So are the rows a CSV cannot give a crystal from before
parsing: a row without its `cif` field, a CIF that is binary (a NUL or non-UTF-8 byte; a binary
`.cif` file too), and an id already kept (`duplicate_id`: the first entry with an id is kept,
in split order). Limits, split settings and the source directory (its path and the names, sizes
and modification times of its files) are part of the config name, so changing any of them
builds a new dataset instead of reusing an old one.

What cannot be built or used at all raises `DatasetError`, one line naming the file or split
and why: an unknown name, a CSV without a `cif` column or that is not a CSV (nor gzip), a
dataset none of whose entries passes, a split asked for that has no crystal.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import importlib.util
import json
import pathlib
import re
import socket
import sys
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from absl import app
from absl import flags
import jax
from jax.experimental import multihost_utils
import numpy as np
import ml_collections
import tensorflow_datasets as tfds
from pymatgen.core import Structure

from crystal_vae import crystals
from crystal_vae import progress

FLAGS = flags.FLAGS

NAMES = ("prototypes", "perov_5", "carbon_24", "mp_20", "csv", "cif_dir")
CDVAE_NAMES = ("perov_5", "carbon_24", "mp_20")
CDVAE_URL = "https://raw.githubusercontent.com/txie-93/cdvae/main/data/{name}/{split}.csv"
SPLITS = ("train", "validation", "test")
DEFAULT_SPLIT_SEED = 0
DEFAULT_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
REJECTED_FILE = "rejected.csv"
# The reason an entry whose id an entry kept before has is skipped (beside `crystals.REASONS`).
DUPLICATE_ID = "duplicate_id"
# A NUL, or a byte that is not UTF-8 (read as a lone surrogate): binary data, not CIF text.
_BINARY = re.compile("[\x00\udc80-\udcff]")

# CSV file stems that name a split, and the split they map to.
_CSV_SPLIT_STEMS = {"train": "train", "val": "validation", "validation": "validation",
                    "test": "test"}
_CSV_SUFFIXES = (".csv", ".csv.gz")
_PROTOTYPES_FILE = "aflow_prototypes.json.gz"
EMBEDDED = {"perov_5": pathlib.Path(__file__).resolve().parent / "data" / "perov_5"}


@dataclasses.dataclass(eq=False)
class CrystalConfig(tfds.core.BuilderConfig):
  """Which crystals to read and which limits they must satisfy."""

  source: str = "prototypes"  # One of `NAMES`.
  path: str = ""
  box: float = crystals.CrystalLimits.box
  max_z: int = crystals.CrystalLimits.max_z
  max_atoms: int = crystals.CrystalLimits.max_atoms
  split_seed: int = DEFAULT_SPLIT_SEED
  split_fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS

  @property
  def limits(self) -> crystals.CrystalLimits:
    return crystals.CrystalLimits(box=self.box, max_z=self.max_z, max_atoms=self.max_atoms)


class DatasetError(ValueError):
  """A dataset that cannot be built, or has no crystal where one is needed (said in one line)."""


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One raw entry of a source: CIF text or a pymatgen structure, and where it came from; an
  entry found unusable before parsing has its (reason, detail) as `rejection`."""

  id: str
  source: str
  cif: str | None = None
  structure: Any = None
  properties: Mapping[str, float] = dataclasses.field(default_factory=dict)
  rejection: tuple[str, str] | None = None


@dataclasses.dataclass(frozen=True)
class _Rejection:
  split: str
  source: str
  error: crystals.RejectedCrystal


class CrystalDataset(tfds.core.GeneratorBasedBuilder):
  """Ordered crystals with lattice, fractional coordinates, atomic numbers and properties."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Initial release.",
                   "1.1.0": "Lattices in the standard orientation; dummy species rejected."}
  BUILDER_CONFIGS = [
      CrystalConfig(name="prototypes", source="prototypes",
                    description="The AFLOW prototypes shipped with pymatgen."),
      *[CrystalConfig(name=name, source=name,
                      description=(f"The CDVAE {name} benchmark, "
                                   + ("embedded." if name in EMBEDDED else "downloaded.")))
        for name in CDVAE_NAMES],
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "material_id": tfds.features.Text(),
            "lattice": tfds.features.Tensor(shape=(3, 3), dtype=np.float64),
            "frac_coords": tfds.features.Tensor(shape=(None, 3), dtype=np.float64),
            "atomic_numbers": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "properties": tfds.features.Text(),  # JSON dict of floats.
        }),
        disable_shuffling=True,  # Records keep the source order within a split.
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    config: CrystalConfig = self.builder_config
    self._rejections: list[_Rejection] = []
    self._logs: dict[str, crystals.RejectionLog] = {}
    self._kept_ids: dict[str, str] = {}  # id -> source of the entry kept with it
    generators = {}
    for split, entries in _split_entries(config, dl_manager).items():
      records = self._convert(split, entries, config.limits)
      if records:
        generators[split] = self._generate_examples(records)
    if not generators:
      raise DatasetError(f"no entry of the {config.source} dataset"
                         f"{' in ' + config.path if config.path else ''} gives a usable crystal: "
                         + ("; ".join(_summary_lines(self._logs)) or "it has none"))
    return generators

  def _convert(self, split: str, entries: Iterator[_Entry],
               limits: crystals.CrystalLimits) -> list[crystals.Crystal]:
    log = self._logs.setdefault(split, crystals.RejectionLog())
    records = []
    counter = progress.Progress(f"{self.builder_config.name}: reading {split}", 0,
                                unit="entries")
    for entry in entries:
      counter.advance()
      rejection = entry.rejection
      if rejection is None and entry.id in self._kept_ids:
        rejection = (DUPLICATE_ID, f"the id of {self._kept_ids[entry.id]}, kept")
      try:
        if rejection is not None:
          raise crystals.RejectedCrystal(entry.id, *rejection)
        if entry.structure is not None:
          crystal = crystals.crystal_from_structure(entry.structure, entry.id, limits,
                                                    entry.properties)
        else:
          crystal = crystals.crystal_from_cif(entry.cif or "", entry.id, limits,
                                              entry.properties)
      except Exception as error:  # pylint: disable=broad-except
        # One bad entry must not stop a build: errors the crystal reader does not name
        # (e.g. a dummy species in a CIF) are counted as unparsable.
        if not isinstance(error, crystals.RejectedCrystal):
          error = crystals.RejectedCrystal(entry.id, crystals.UNPARSABLE,
                                           f"{type(error).__name__}: {error}"[:200])
        log.reject(error)
        self._rejections.append(_Rejection(split, entry.source, error))
        continue
      log.keep()
      self._kept_ids[entry.id] = entry.source
      records.append(crystal)
    return records

  def _generate_examples(self, records: Sequence[crystals.Crystal]):
    for position, crystal in enumerate(records):
      yield position, {
          "material_id": crystal.id,
          "lattice": crystal.lattice,
          "frac_coords": crystal.frac_coords.reshape(-1, 3),
          "atomic_numbers": crystal.atomic_numbers,
          "properties": json.dumps(dict(sorted(crystal.properties.items()))),
      }

  def _download_and_prepare(self, dl_manager, download_config) -> None:
    super()._download_and_prepare(dl_manager, download_config)
    rejected = pathlib.Path(self.data_dir) / REJECTED_FILE
    _write_rejections(rejected, self._rejections)
    for line in _summary_lines(self._logs):
      print(f"{self.name}/{self.builder_config.name}: {line}", flush=True)

  def _log_download_bytes(self) -> None:
    """Replaces TFDS's "Downloading and preparing dataset Unknown size ..." line."""
    print(f"Building {self.name}/{self.builder_config.name} in {self.data_dir} (once) ...",
          flush=True)

  def _log_download_done(self) -> None:
    print(f"Built {self.name}/{self.builder_config.name}.", flush=True)


def record_to_crystal(record: Mapping[str, Any]) -> crystals.Crystal:
  """A stored record (as read from a data source) -> `crystals.Crystal`."""
  material_id = record["material_id"]
  properties = record["properties"]
  return crystals.Crystal(
      id=material_id.decode() if isinstance(material_id, bytes) else str(material_id),
      lattice=np.asarray(record["lattice"], dtype=np.float64).reshape(3, 3),
      frac_coords=np.asarray(record["frac_coords"], dtype=np.float64).reshape(-1, 3),
      atomic_numbers=np.asarray(record["atomic_numbers"], dtype=np.int32),
      properties=json.loads(properties.decode() if isinstance(properties, bytes)
                            else properties))


def builder_config(dataset_config: Any) -> CrystalConfig:
  """The builder config for `dataset_config` (fields as in the module docstring).

  Returns the predefined config when `path`, limits and split settings are the defaults;
  otherwise a config named `<name>[-box..-z..-n..][-split..][-p<hash of the source dir>]`.
  """
  name = _field(dataset_config, "name", "prototypes")
  if name not in NAMES:
    raise DatasetError(f"unknown dataset name {name!r}; expected one of {NAMES}")
  path = _field(dataset_config, "path", "")
  path = str(pathlib.Path(path).expanduser().resolve()) if path else ""
  if name == "prototypes" and path:
    raise DatasetError("the prototypes dataset is embedded; leave path empty")
  if name in ("csv", "cif_dir") and not path:
    raise DatasetError(f"the {name} dataset needs a path to a directory")
  config = CrystalConfig(
      name=name, source=name, path=path,
      box=float(_field(dataset_config, "box", crystals.CrystalLimits.box)),
      max_z=int(_field(dataset_config, "max_z", crystals.CrystalLimits.max_z)),
      max_atoms=int(_field(dataset_config, "max_atoms", crystals.CrystalLimits.max_atoms)),
      split_seed=int(_field(dataset_config, "split_seed", DEFAULT_SPLIT_SEED)),
      split_fractions=tuple(float(f) for f in _field(dataset_config, "split_fractions",
                                                     DEFAULT_SPLIT_FRACTIONS)))
  if len(config.split_fractions) != 3 or min(config.split_fractions) < 0 or not sum(
      config.split_fractions) > 0:
    raise DatasetError(f"split_fractions must be 3 non-negative numbers, got "
                       f"{config.split_fractions}")
  suffix = ""
  if config.limits != crystals.CrystalLimits():
    suffix += f"-box{config.box:g}-z{config.max_z}-n{config.max_atoms}"
  if (config.split_seed, config.split_fractions) != (DEFAULT_SPLIT_SEED,
                                                     DEFAULT_SPLIT_FRACTIONS):
    suffix += f"-split{config.split_seed}-" + "-".join(f"{f:g}" for f in config.split_fractions)
  if path:
    suffix += f"-p{_directory_fingerprint(pathlib.Path(path))}"
  if not suffix and name in CrystalDataset.builder_configs:
    return CrystalDataset.builder_configs[name]
  return dataclasses.replace(
      config, name=name + suffix,
      description=f"{name} from {path or 'the default source'} with {config.limits}, split "
      f"seed {config.split_seed}, fractions {config.split_fractions}.")


def make_builder(dataset_config: Any) -> CrystalDataset:
  """The (not necessarily built) builder for `dataset_config`."""
  data_dir = _field(dataset_config, "data_dir", "") or None
  return CrystalDataset(config=builder_config(dataset_config), data_dir=data_dir,
                        file_format="array_record")


def load_data_sources(dataset_config: Any) -> dict[str, Sequence[Mapping[str, Any]]]:
  """Random-access sources keyed by split ('train', 'validation', 'test' where present).

  Builds the dataset on first use. Records are dicts of numpy arrays with the features of
  `CrystalDataset`; `record_to_crystal` turns one into a `crystals.Crystal`.
  """
  if jax.process_index() == 0:
    builder = make_builder(dataset_config)
    if not builder.is_prepared():
      builder.download_and_prepare()
      print(f"Skipped entries and their reasons: {rejected_path(builder)}", flush=True)
  if jax.process_count() > 1:  # the others wait for process 0's build instead of racing it
    multihost_utils.sync_global_devices(f"built {builder_config(dataset_config).name}")
  # Made after the build, so that every process reads the built dataset's information.
  sources = make_builder(dataset_config).as_data_source()
  return {split: sources[split] for split in SPLITS if split in sources}


def split_source(dataset_config: Any, split: str) -> Sequence[Mapping[str, Any]]:
  """The source of one split; `DatasetError` when the dataset has no crystal in it."""
  sources = load_data_sources(dataset_config)
  if split not in sources:
    builder = make_builder(dataset_config)
    counts = [line for line in build_summary(builder) if line.startswith(f"{split}:")]
    raise DatasetError(
        f"dataset {dataset_config.name!r} has no {split!r} crystal (its splits: "
        f"{', '.join(sorted(sources))})" + (f"; {counts[0]}, see {rejected_path(builder)}"
                                            if counts else ""))
  return sources[split]


def rejected_path(builder: CrystalDataset) -> pathlib.Path:
  """Where a build lists its skipped entries."""
  return pathlib.Path(builder.data_dir) / REJECTED_FILE


def build_summary(builder: CrystalDataset) -> list[str]:
  """`<split>: kept N, skipped M (reason=k, ...)` for each split of a finished build."""
  logs = {}
  for split, info in builder.info.splits.items():
    logs[split] = crystals.RejectionLog()
    logs[split].kept = info.num_examples
  with open(rejected_path(builder), newline="") as handle:
    for row in csv.DictReader(handle):
      logs.setdefault(row["split"], crystals.RejectionLog()).reject(
          crystals.RejectedCrystal(row["id"], row["reason"], row["detail"]))
  return _summary_lines(logs)


def _summary_lines(logs: Mapping[str, crystals.RejectionLog]) -> list[str]:
  """`<split>: kept N, skipped M (reason=k, ...)`, the crystal reasons first, then the others
  (`DUPLICATE_ID`)."""
  lines = []
  for split in SPLITS:
    if split not in logs:
      continue
    counts = logs[split].counts()
    reasons = [*[r for r in crystals.REASONS if r in counts], *sorted(set(counts) - set(
        crystals.REASONS))]
    by_reason = ", ".join(f"{reason}={counts[reason]}" for reason in reasons)
    lines.append(f"{split}: kept {logs[split].kept}, skipped {len(logs[split].rejected)}"
                 + (f" ({by_reason})" if by_reason else ""))
  return lines


def _write_rejections(path: pathlib.Path, rejections: Sequence[_Rejection]) -> None:
  with open(path, "w", newline="") as handle:
    writer = csv.writer(handle)
    writer.writerow(["split", "id", "reason", "detail", "source"])
    for rejection in rejections:
      error = rejection.error
      writer.writerow([rejection.split, error.crystal_id, error.reason, error.detail,
                       rejection.source])


def _field(dataset_config: Any, name: str, default: Any) -> Any:
  value = getattr(dataset_config, name, None)
  return default if value is None else value


def _directory_fingerprint(directory: pathlib.Path) -> str:
  """Short hash of a directory's path and the names, sizes and mtimes of its files."""
  if not directory.is_dir():
    raise FileNotFoundError(f"no such directory: {directory}")
  digest = hashlib.sha1(str(directory).encode())
  for file in sorted(p for p in directory.iterdir() if p.is_file()):
    stat = file.stat()
    digest.update(f"\n{file.name}\t{stat.st_size}\t{stat.st_mtime_ns}".encode())
  return digest.hexdigest()[:8]


def _split_entries(config: CrystalConfig,
                   dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator[_Entry]]:
  """The raw entries of each split of the source named by `config`."""
  if config.source == "prototypes":
    return _split_list(_prototype_entries(), config)
  if config.source == "cif_dir":
    return _split_list(_cif_dir_entries(pathlib.Path(config.path)), config)
  if config.path:
    files = _csv_split_files(pathlib.Path(config.path))
  elif config.source in EMBEDDED:
    files = _csv_split_files(EMBEDDED[config.source])
  else:
    if config.source not in CDVAE_NAMES:
      raise ValueError(f"{config.source} needs a path")
    files = _download(config.source, dl_manager)
  if list(files) == [None]:
    return _split_list(list(_csv_entries(files[None])), config)
  return {split: _csv_entries(files[split]) for split in SPLITS if split in files}


def _download(name: str, dl_manager: tfds.download.DownloadManager
              ) -> dict[str, pathlib.Path]:
  """The CDVAE CSVs of `name`, downloaded once; without a network a one-line `DownloadError`."""
  urls = {split: CDVAE_URL.format(name=name, split=stem)
          for stem, split in (("train", "train"), ("val", "validation"), ("test", "test"))}
  try:
    socket.create_connection((urllib.parse.urlparse(CDVAE_URL).hostname, 443), timeout=5).close()
  except OSError as error:
    raise DownloadError(
        f"cannot download the {name} CSVs ({error.__class__.__name__}: {error}): no network? Give"
        f" a directory holding train/val/test.csv[.gz] with --config.dataset.path=DIR") from None
  return {split: pathlib.Path(path) for split, path in dl_manager.download(urls).items()}


class DownloadError(OSError):
  """A dataset that had to be downloaded and could not be (said in one line)."""


def _csv_split_files(directory: pathlib.Path) -> dict[str | None, pathlib.Path]:
  """CSV file of each split, or `{None: file}` for a directory with a single CSV."""
  if not directory.is_dir():
    raise FileNotFoundError(f"no such directory: {directory}")
  csv_files = sorted(p for p in directory.iterdir()
                     if p.is_file() and p.name.endswith(_CSV_SUFFIXES))
  by_split = {}
  for file in csv_files:
    stem = file.name.removesuffix(".gz").removesuffix(".csv")
    if stem in _CSV_SPLIT_STEMS:
      split = _CSV_SPLIT_STEMS[stem]
      if split in by_split:
        raise DatasetError(f"two files for split {split}: {by_split[split]} and {file}")
      by_split[split] = file
  if by_split:
    return by_split
  if len(csv_files) == 1:
    return {None: csv_files[0]}
  raise DatasetError(f"{directory} must hold train/val/test.csv[.gz] or exactly one CSV file;"
                     f" found {[p.name for p in csv_files]}")


def _text_rejection(text: str | None, what: str) -> tuple[str, str] | None:
  """(UNPARSABLE, why) for CIF text that is missing or binary, else None."""
  if text is None:
    return crystals.UNPARSABLE, f"{what} is missing"
  binary = _BINARY.search(text)
  if binary:
    byte = ord(binary.group()) & 0xFF
    return crystals.UNPARSABLE, (f"{what} is binary, not CIF text (byte 0x{byte:02x} at"
                                 f" character {binary.start()})")
  return None


def _csv_entries(path: pathlib.Path) -> Iterator[_Entry]:
  """Rows of a CDVAE-style CSV; non-numeric and unnamed index columns are not properties. A
  row without its `cif` field or whose CIF is binary is an entry rejected before parsing; a file
  that is not a CSV (or not gzip) raises `DatasetError`."""
  csv.field_size_limit(sys.maxsize)
  opener = gzip.open if path.name.endswith(".gz") else open
  try:
    with opener(path, "rt", newline="", errors="surrogateescape") as handle:
      reader = csv.DictReader(handle)
      if "cif" not in (reader.fieldnames or []):
        raise DatasetError(f"{path} has no 'cif' column (its columns: {reader.fieldnames});"
                           " a CDVAE-style CSV has material_id, cif and property columns")
      index_columns = [c for c in reader.fieldnames if not c or c.startswith("Unnamed")]
      for row_number, row in enumerate(reader, start=1):
        crystal_id = (row.get("material_id") or "").strip() or f"{path.name}:{row_number}"
        yield _Entry(id=crystal_id, source=f"{path}:row {row_number}", cif=row["cif"],
                     properties=crystals.numeric_properties(
                         row, exclude=["material_id", "cif", *index_columns]),
                     rejection=_text_rejection(row["cif"], "the row's cif field"))
  except (csv.Error, OSError, EOFError) as error:
    raise DatasetError(f"{path} cannot be read as a CSV{' (gzip)' if opener is gzip.open else ''}:"
                       f" {type(error).__name__}: {error}") from None


def _cif_dir_entries(directory: pathlib.Path) -> list[_Entry]:
  if not directory.is_dir():
    raise FileNotFoundError(f"no such directory: {directory}")
  entries = []
  for path in sorted(directory.glob("*.cif")):
    try:
      text = path.read_bytes().decode("utf-8", errors="surrogateescape")
      rejection = _text_rejection(text, "the file")
    except OSError as error:
      text, rejection = "", (crystals.UNPARSABLE, f"cannot be read: {error}")
    entries.append(_Entry(id=path.stem, source=str(path), cif=text, rejection=rejection))
  return entries


def _prototype_entries() -> list[_Entry]:
  """pymatgen's AFLOW prototypes; ids are AFLOW labels, repeats get `-2`, `-3`, ..."""
  # Located without importing pymatgen.analysis.prototypes, which decodes this file on import.
  package = importlib.util.find_spec("pymatgen.analysis.prototypes")
  path = pathlib.Path(package.submodule_search_locations[0]) / _PROTOTYPES_FILE
  with gzip.open(path, "rt") as handle:
    prototypes = json.load(handle)
  entries, seen = [], {}
  for position, prototype in enumerate(prototypes):
    label = prototype["tags"]["aflow"]
    seen[label] = seen.get(label, 0) + 1
    crystal_id = label if seen[label] == 1 else f"{label}-{seen[label]}"
    entries.append(_Entry(id=crystal_id, source=f"{_PROTOTYPES_FILE}[{position}]",
                          structure=Structure.from_dict(prototype["snl"])))
  return entries


def split_positions(num_entries: int, fractions: Sequence[float],
                    seed: int) -> dict[str, np.ndarray]:
  """Seeded split of `range(num_entries)` by `fractions`; each split sorted ascending."""
  fractions = np.asarray(fractions, dtype=np.float64) / np.sum(fractions)
  bounds = np.round(np.cumsum(fractions) * num_entries).astype(int)
  permutation = np.random.default_rng(seed).permutation(num_entries)
  starts = np.concatenate([[0], bounds[:-1]])
  return {split: np.sort(permutation[start:end])
          for split, start, end in zip(SPLITS, starts, bounds)}


def _split_list(entries: Sequence[_Entry], config: CrystalConfig) -> dict[str, Iterator[_Entry]]:
  positions = split_positions(len(entries), config.split_fractions, config.split_seed)
  return {split: iter([entries[i] for i in positions[split]]) for split in SPLITS}


def _define_flags() -> None:
  flags.DEFINE_enum("name", "prototypes", NAMES, "Dataset to build.")
  flags.DEFINE_string("path", "", "Source directory ('' = embedded or download).")
  flags.DEFINE_string("data_dir", "", "TFDS data dir ('' = the TFDS default).")
  flags.DEFINE_float("box", crystals.CrystalLimits.box, "Longest cell side must be < box.")
  flags.DEFINE_integer("max_z", crystals.CrystalLimits.max_z, "Largest atomic number.")
  flags.DEFINE_integer("max_atoms", crystals.CrystalLimits.max_atoms, "Most atoms per cell.")
  flags.DEFINE_integer("split_seed", DEFAULT_SPLIT_SEED, "Seed of the split.")
  flags.DEFINE_list("split_fractions", [f"{f:g}" for f in DEFAULT_SPLIT_FRACTIONS],
                    "train,validation,test fractions for single-list sources.")


def main(argv: Sequence[str]) -> None:
  del argv
  dataset_config = ml_collections.ConfigDict({
      "name": FLAGS.name, "path": FLAGS.path, "data_dir": FLAGS.data_dir, "box": FLAGS.box,
      "max_z": FLAGS.max_z, "max_atoms": FLAGS.max_atoms, "split_seed": FLAGS.split_seed,
      "split_fractions": tuple(float(f) for f in FLAGS.split_fractions)})
  builder = make_builder(dataset_config)
  builder.download_and_prepare()
  print(f"built {builder.name}/{builder.builder_config.name} in {builder.data_dir}")
  for line in build_summary(builder):
    print(line)
  print(f"rejected entries: {rejected_path(builder)}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
