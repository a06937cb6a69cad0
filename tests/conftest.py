"""Test setup: 8 fake CPU devices for JAX (before JAX starts), offline HF, tiny random reference models."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402

from qwen35_jax.hf_reference import build_hf_model, save_hf_model  # noqa: E402


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """Builds (once per session) and returns (hf_model, folder) for a preset name."""
    cache = {}

    def get(preset: str):
        if preset not in cache:
            model = build_hf_model(preset, seed=0)
            cache[preset] = (model, save_hf_model(model, tmp_path_factory.mktemp(preset)))
        return cache[preset]
    return get
