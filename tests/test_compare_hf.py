"""The verify tool as a user runs it: exit status and the --json line."""

import json

from qwen35_jax import compare_hf


def test_compare_hf_passes_and_reports_json(hf_checkpoint, capsys):
    _, folder = hf_checkpoint("tiny-moe")
    code = compare_hf.main(["--hf-dir", str(folder), "--seq-len", "20", "--batch", "2", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0
    assert result["max_abs_err"] <= 1e-4 and result["top1_agreement"] == 1.0
    assert 0 < result["mean_abs_err"] <= result["max_abs_err"]


def test_compare_hf_fails_above_tolerance(hf_checkpoint, capsys):
    _, folder = hf_checkpoint("tiny-dense")
    code = compare_hf.main(["--hf-dir", str(folder), "--seq-len", "8", "--tolerance", "1e-12", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 1 and result["passed"] is False and result["max_abs_err"] > 1e-12
