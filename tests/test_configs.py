"""configs/: every default once in `default.py`, the recipes change only fields it defines, the
model's fields come from the config alone, and the package finds the defaults wherever it runs."""

import dataclasses
import importlib.util
import pathlib
import subprocess
import sys

import pytest

from crystal_vae import models
from crystal_vae.configs import default
from crystal_vae.configs import recipes

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def flat_keys(tree: dict, prefix: str = "") -> set[str]:
  keys = set()
  for key, value in tree.items():
    keys |= flat_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key}
  return keys


def test_the_model_takes_every_field_from_the_config_and_has_no_defaults_of_its_own():
  fields = {field.name: field for field in dataclasses.fields(models.CrystalVAE)
            if field.name not in ("parent", "name")}
  set_elsewhere = {"grid", "max_z"}  # from config.voxel.grid and config.dataset.max_z
  assert set(default.get_config().model) == set(fields) - set_elsewhere
  assert all(field.default is dataclasses.MISSING for field in fields.values())


@pytest.mark.parametrize("representation", default.REPRESENTATIONS)
@pytest.mark.parametrize("recipe", sorted(recipes.RECIPES))
def test_a_recipe_changes_only_fields_the_defaults_define(representation, recipe):
  """A misspelt field in a recipe would add a new key that nothing reads."""
  paper = default.get_config(representation).to_dict()
  changed = recipes.get_config(representation, recipe).to_dict()
  assert flat_keys(changed) == flat_keys(paper)
  assert changed != paper


@pytest.mark.parametrize("representation", default.REPRESENTATIONS)
def test_the_representation_files_are_the_recipes_for_their_representation(representation):
  spec = importlib.util.spec_from_file_location("config_file", CONFIGS / f"{representation}.py")
  config_file = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(config_file)
  for recipe in (None, "quick", "mp_cpu"):
    config = config_file.get_config(recipe)
    assert config.representation == representation
    assert config.to_dict() == recipes.get_config(representation, recipe).to_dict()
  assert config_file.get_config().to_dict() == default.get_config(representation).to_dict()


def test_the_representations_differ_only_in_how_the_crystal_is_placed():
  repeat, unit_cell = default.get_config("repeat"), default.get_config("unit_cell")
  assert (repeat.voxel.random_offset, repeat.voxel.rotate) == (True, False)
  assert (unit_cell.voxel.random_offset, unit_cell.voxel.rotate) == (False, True)
  unit_cell.representation = "repeat"
  unit_cell.voxel.random_offset, unit_cell.voxel.rotate = True, False
  assert unit_cell.to_dict() == repeat.to_dict()


def test_no_default_names_a_path():
  for representation in default.REPRESENTATIONS:
    for recipe in (None, *recipes.RECIPES):
      config = recipes.get_config(representation, recipe)
      assert (config.dataset.path, config.dataset.data_dir, config.init_from) == ("", "", "")


def test_an_unknown_recipe_or_representation_is_refused_by_name():
  with pytest.raises(ValueError, match="unknown recipe 'fast'.*'quick'"):
    recipes.get_config("repeat", "fast")
  with pytest.raises(ValueError, match="representation must be one of"):
    default.get_config("supercell")


def test_the_installed_package_finds_its_defaults_outside_the_repository(tmp_path):
  run = subprocess.run(
      [sys.executable, "-c", "from crystal_vae.configs import default; "
       "print(default.get_config('unit_cell').model.latent_dim)"],
      cwd=tmp_path, capture_output=True, text=True, check=True, timeout=120)
  assert run.stdout.split() == ["300"]


def test_an_unknown_recipe_on_the_command_line_is_one_line():
  run = subprocess.run([sys.executable, "-m", "crystal_vae.main", "--config=configs/repeat.py:fast",
                        "--workdir=unused"], cwd=CONFIGS.parent, capture_output=True, text=True,
                       timeout=120, check=False)
  assert run.returncode != 0
  assert run.stderr.strip().splitlines()[-1] == (
      "error: --config=configs/repeat.py:fast: unknown recipe 'fast'; use one of ('paper', "
      "'quick', 'cpu', 'gpu', 'mp_cpu', 'mp_gpu') or nothing")
  assert "Traceback" not in run.stderr
