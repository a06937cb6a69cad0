"""The verify tool as a user runs it: exit status, the --json line, tolerances that pass correct conversions
(also with a trained model's large logits) and fail wrong ones, one-line errors."""

import json
import os
import subprocess
import sys
import tempfile

import jax.numpy as jnp
import pytest
import torch
from flax import nnx

from qwen35_jax import compare_hf
from qwen35_jax.checkpoint.orbax_io import save_model
from qwen35_jax.config import ModelConfig
from qwen35_jax.hf_reference import build_hf_model, save_hf_model
from qwen35_jax.nn.model import Qwen35


def run_json(capsys, *args) -> tuple[int, dict]:
    code = compare_hf.main([*args, "--json"])
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_compare_hf_passes_and_reports_json(hf_checkpoint, capsys):
    _, folder = hf_checkpoint("tiny-moe")
    code, result = run_json(capsys, "--hf-dir", str(folder), "--seq-len", "20", "--batch", "2")
    assert code == 0 and result["passed"] is True
    assert result["max_abs_err"] <= 1e-4 and result["top1_agreement"] == 1.0
    assert 0 < result["mean_abs_err"] <= result["max_abs_err"]


def test_compare_hf_fails_above_tolerance(hf_checkpoint, capsys):
    _, folder = hf_checkpoint("tiny-dense")
    code, result = run_json(capsys, "--hf-dir", str(folder), "--seq-len", "8", "--tolerance", "1e-12")
    assert code == 1 and result["passed"] is False and result["max_abs_err"] > 1e-12


@pytest.fixture(scope="module")
def large_logits(tmp_path_factory):
    """A correct checkpoint with logits of a few hundred, as a trained model has (lm_head x 1000): float32
    rounding differences grow with them (~3e-4 here, above a fixed 1e-4)."""
    model = build_hf_model("tiny-moe")
    with torch.no_grad():
        model.lm_head.weight.mul_(1000.0)
    return save_hf_model(model, tmp_path_factory.mktemp("large-logits"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_large_logits_pass_by_their_scale(large_logits, capsys, dtype):
    code, result = run_json(capsys, "--hf-dir", str(large_logits), "--seq-len", "20", "--dtype", dtype)
    assert result["max_abs_logit"] > 100
    if dtype == "float32":
        assert result["tolerance"] == pytest.approx(compare_hf.FLOAT32_RELATIVE * result["max_abs_logit"])
    else:  # judged against HF's own bf16 error on the same tokens
        assert result["hf_bf16_err"] > 1.0
        assert result["tolerance"] == pytest.approx(compare_hf.BF16_MULTIPLE * result["hf_bf16_err"])
    assert code == 0 and result["passed"] is True and result["top1_agreement"] >= 0.95


@pytest.mark.parametrize("dtype, factor", [
    ("float32", 1.001),  # every logit 0.1% off: ~7x the float32 tolerance
    ("bfloat16", 1.2),   # 20% off: ~4x HF's own bf16 error on this model (~3% of the largest logit)
])
def test_a_wrong_model_fails(hf_checkpoint, capsys, monkeypatch, dtype, factor):
    """Our side loads with a scaled lm_head (as a conversion bug would): compare_hf must exit 1."""
    _, folder = hf_checkpoint("tiny-moe")
    load = compare_hf.load_model

    def perturbed(path, dtype):
        model = load(path, dtype=dtype)
        model.lm_head.set_value(model.lm_head.get_value() * factor)
        return model
    monkeypatch.setattr(compare_hf, "load_model", perturbed)
    code, result = run_json(capsys, "--hf-dir", str(folder), "--seq-len", "20", "--dtype", dtype)
    assert code == 1 and result["passed"] is False and result["max_abs_err"] > result["tolerance"]


def test_bfloat16_of_a_correct_conversion_passes(hf_checkpoint, capsys):
    _, folder = hf_checkpoint("tiny-dense")
    code, result = run_json(capsys, "--hf-dir", str(folder), "--seq-len", "20", "--dtype", "bfloat16")
    assert code == 0 and 0 < result["max_abs_err"] <= result["tolerance"]


def test_tiny_leaves_no_temporary_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert compare_hf.main(["--tiny", "tiny-dense", "--seq-len", "4", "--batch", "1"]) == 0
    assert "PASS" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_bad_folders_are_one_line_errors(tmp_path, capsys):
    assert compare_hf.main(["--hf-dir", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such folder" in one_line_error(capsys)
    assert compare_hf.main(["--hf-dir", str(tmp_path)]) == 2
    assert "no config.json" in one_line_error(capsys)
    orbax = save_model(Qwen35(ModelConfig.from_hf("tiny-dense"), jnp.float32, nnx.Rngs(0)), tmp_path / "ckpt")
    capsys.readouterr()
    assert compare_hf.main(["--hf-dir", str(orbax)]) == 2
    err = one_line_error(capsys)
    assert "an Orbax checkpoint" in err and "needs an HF folder" in err and "--to-hf" in err


def test_without_torch_says_what_to_install(hf_checkpoint):
    _, folder = hf_checkpoint("tiny-dense")
    code = ("import sys; sys.modules['torch'] = None\n"
            "from qwen35_jax.compare_hf import main\n"
            f"sys.exit(main(['--hf-dir', {str(folder)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "needs torch and transformers" in done.stderr and "pip install -e '.[test]'" in done.stderr
