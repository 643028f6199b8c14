"""The colabs run top to bottom with small settings and display images."""

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


def test_quick_start_then_sampling_notebook(tmp_path, tfds_dir, monkeypatch):
  monkeypatch.setenv("CRYSTAL_VAE_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("CRYSTAL_VAE_WORKDIR", str(tmp_path / "workdir"))
  monkeypatch.setenv("CRYSTAL_VAE_DATA_DIR", tfds_dir)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  quick = _run("quick_start.ipynb", tmp_path)
  assert _images(quick).count("image/png") == 2  # loss curve, true vs decoded slices
  assert (tmp_path / "reconstruction.png").exists()
  assert (tmp_path / "workdir" / "checkpoints" / "2").exists()
  sampling = _run("sampling_and_interpolation.ipynb", tmp_path)  # reuses the checkpoint
  assert sorted(_images(sampling)) == ["image/gif", "image/png", "image/png", "image/png"]
  assert len(list((tmp_path / "workdir" / "notebook" / "sample" / "cifs").glob("*"))) >= 1


@pytest.mark.parametrize("name, images", [
    ("quick_start.ipynb", ["image/png", "image/png"]),
    ("sampling_and_interpolation.ipynb", ["image/gif", "image/png", "image/png", "image/png"])])
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
