"""The colabs run top to bottom with small settings and display images."""

import json
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

COLABS = pathlib.Path(__file__).parent.parent / "colabs"


def _run(name: str, directory: pathlib.Path) -> nbformat.NotebookNode:
  notebook = nbformat.read(COLABS / name, as_version=4)
  # Raises CellExecutionError (with the cell's traceback) when a cell fails.
  NotebookClient(notebook, timeout=300, kernel_name="python3",
                 resources={"metadata": {"path": str(directory)}}).execute()
  return notebook


def _images(notebook: nbformat.NotebookNode) -> list[str]:
  return [mime for cell in notebook.cells if cell.cell_type == "code"
          for output in cell.get("outputs", []) for mime in output.get("data", {})
          if mime.startswith("image/")]


QUICK_IMAGES = ["image/png"] * 3  # learning curves, true vs rebuilt crystals, density slices
SAMPLING_IMAGES = ["image/gif"] + ["image/png"] * 4  # gallery, draws, interpolation, traversal


@pytest.fixture
def small_notebook(tmp_path, tfds_dir, monkeypatch):
  monkeypatch.setenv("CRYSTAL_VAE_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("CRYSTAL_VAE_WORKDIR", str(tmp_path / "workdir"))
  monkeypatch.setenv("CRYSTAL_VAE_DATA_DIR", tfds_dir)
  monkeypatch.setenv("TFDS_DATA_DIR", tfds_dir)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  return tmp_path


@pytest.mark.slow
def test_quick_start_notebook_trains_and_rebuilds_validation_crystals(small_notebook):
  quick = _run("quick_start.ipynb", small_notebook)
  assert sorted(_images(quick)) == QUICK_IMAGES
  assert (small_notebook / "reconstruction.png").exists()
  assert (small_notebook / "workdir" / "checkpoints" / "4").exists()
  rebuilt = json.loads((small_notebook / "workdir" / "eval" / "validation" / "metrics.json")
                       .read_text())
  assert rebuilt["num_samples"] == 8


@pytest.mark.slow
def test_sampling_notebook_restores_the_shipped_model(small_notebook):
  sampling = _run("sampling_and_interpolation.ipynb", small_notebook)
  assert sorted(_images(sampling)) == SAMPLING_IMAGES
  out = small_notebook / "workdir" / "perov5_repeat"
  assert len(list((out / "sample" / "cifs").glob("*.cif"))) >= 1
  assert (out / "interpolate" / "interpolation.gif").exists()


@pytest.mark.parametrize("name, images", [("quick_start.ipynb", QUICK_IMAGES),
                                          ("sampling_and_interpolation.ipynb", SAMPLING_IMAGES)])
def test_notebooks_start_with_a_guarded_install_and_are_saved_with_outputs(name, images):
  """Saved as run top to bottom (every code cell executed, in order; the figures kept), so that
  they read without running; the install cell only runs where crystal_vae is not importable."""
  notebook = nbformat.read(COLABS / name, as_version=4)
  nbformat.validate(notebook)
  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  assert 'find_spec("crystal_vae") is None' in code[0].source
  assert "pip install" in code[0].source
  assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
  assert not [output for cell in code for output in cell.outputs if output.output_type == "error"]
  assert sorted(_images(notebook)) == images
