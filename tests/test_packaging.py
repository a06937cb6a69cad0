"""Packaging: bundled presets, recipes and benchmark configs are package data that load; console scripts resolve.

The wheel itself is checked by `.ci/check_wheel.sh` (non-editable install in a clean venv, loaded from outside the
repo); these tests hold the pieces that check relies on: the package-data globs cover every bundled file, every
bundled file loads, and every console script names a callable that exits with its return code.
"""

import dataclasses
import fnmatch
import importlib
import json
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from transformers import Qwen3_5Config, Qwen3_5MoeConfig, Qwen3_5MoeTextConfig, Qwen3_5TextConfig

from benchmarks.common import bench_config, bench_config_names
from qwen35_jax.config import PRESET_DIR, VISION_TOKEN_FIELDS, ConfigError, ModelConfig, preset_names
from qwen35_jax.hf_reference import random_checkpoint
from train.config import TrainConfig, TrainConfigError, recipe_names

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
HF_CLASSES = {"qwen3_5": Qwen3_5Config, "qwen3_5_moe": Qwen3_5MoeConfig, "qwen3_5_text": Qwen3_5TextConfig,
              "qwen3_5_moe_text": Qwen3_5MoeTextConfig}
BUNDLED = [("qwen35_jax", "presets"), ("train", "recipes"), ("benchmarks", "configs")]


@pytest.mark.parametrize("package, folder", BUNDLED)
def test_package_data_globs_cover_every_bundled_file(package, folder):
    globs = PYPROJECT["tool"]["setuptools"]["package-data"][package]
    files = sorted(p.relative_to(ROOT / package).as_posix() for p in (ROOT / package / folder).iterdir())
    assert files, f"{package}/{folder} is empty"
    left_out = [f for f in files if not any(fnmatch.fnmatch(f, g) for g in globs)]
    assert not left_out, f"not in [tool.setuptools.package-data] {package} = {globs}: {left_out}"


def test_lookups_list_the_bundled_files():
    assert preset_names() == tuple(sorted(p.stem for p in (ROOT / "qwen35_jax/presets").glob("*.json")))
    assert recipe_names() == ("demo", "demo-series", "demo-series-wide", "sft-example")
    assert bench_config_names() == ("small-dense", "small-moe")
    assert {"tiny-dense", "tiny-moe", "qwen3.5-0.8b", "qwen3.5-397b-a17b"} <= set(preset_names())


def hf_config(data: dict):
    """HF's own config class for a preset's model_type, built from the same file."""
    kwargs = {k: v for k, v in data.items() if k != "model_type"}
    return HF_CLASSES[data["model_type"]](**kwargs)


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_and_matches_hf(name):
    cfg = ModelConfig.from_hf(name)
    hf = hf_config(json.loads((PRESET_DIR / f"{name}.json").read_text()))
    text = getattr(hf, "text_config", hf)
    shared = [f.name for f in dataclasses.fields(cfg) if hasattr(text, f.name)]
    assert {"vocab_size", "hidden_size", "num_hidden_layers", "layer_types", "head_dim",
            "num_key_value_heads", "linear_num_value_heads", "tie_word_embeddings"} <= set(shared)
    for field in shared:
        theirs = getattr(text, field)
        assert getattr(cfg, field) == (tuple(theirs) if isinstance(theirs, list) else theirs), field
    rope = text.rope_parameters
    assert (cfg.rope_theta, cfg.partial_rotary_factor, list(cfg.mrope_section)) == (
        rope["rope_theta"], rope["partial_rotary_factor"], rope["mrope_section"])
    assert cfg.is_moe == isinstance(text, Qwen3_5MoeTextConfig)
    if hasattr(hf, "vision_config"):
        for f in dataclasses.fields(cfg.vision):  # the multimodal token ids are top-level fields in HF
            source = hf if f.name in VISION_TOKEN_FIELDS else hf.vision_config
            assert getattr(cfg.vision, f.name) == getattr(source, f.name), f"vision.{f.name}"


def test_unknown_preset_names_the_presets():
    with pytest.raises(ConfigError, match="preset name .*tiny-moe"):
        ModelConfig.from_hf("tiny-moee")


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_loads_by_name(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a name, not a path relative to the repo
    assert TrainConfig.load(name) == TrainConfig.load(ROOT / "train/recipes" / f"{name}.yaml")


def test_demo_recipe_model_is_a_preset_and_unknown_recipe_names_the_recipes():
    assert TrainConfig.load("demo").model in preset_names()
    with pytest.raises(TrainConfigError, match="demo, demo-series, demo-series-wide, sft-example"):
        TrainConfig.load("dmeo")


@pytest.mark.parametrize("name", bench_config_names())
def test_benchmark_configs_load_by_name(name):
    path = bench_config(name)
    assert Path(path) == ROOT / "benchmarks/configs" / f"{name}.json"
    data = json.loads(Path(path).read_text())
    cfg = ModelConfig.from_hf(path)
    assert hf_config(data).hidden_size == cfg.hidden_size and cfg.num_hidden_layers == 8
    assert bench_config("tiny-moe") == "tiny-moe"  # a model preset name passes through


@pytest.mark.parametrize("script, target", sorted(PYPROJECT["project"]["scripts"].items()))
def test_console_script_targets_are_mains(script, target):
    module, func = target.split(":")
    main = getattr(importlib.import_module(module), func)
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0, script


def test_installed_console_script_exits_with_mains_code():
    exe = shutil.which("qwen35-dryrun")
    if exe is None:
        pytest.skip("console scripts not installed in this environment (pip install -e .)")
    out = subprocess.run([exe, "--model", "no-such-preset", "--devices", "1", "--mesh", "data=1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "no-such-preset" in out.stderr and "qwen3.5-9b" in out.stderr, out.stderr


def test_random_checkpoint_removes_its_folder():
    with random_checkpoint("tiny-dense") as (model, folder):
        assert (folder / "config.json").is_file() and model.config.hidden_size == 64
    assert not folder.exists()
