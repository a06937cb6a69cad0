"""What a new user meets at the command line: relative checkpoint paths, one-line errors, overrides anywhere,
defaults in --help, a demo that never deletes a folder unasked and says what to run next, loss.png."""

import json
import re
import shlex
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from infer import generate
from qwen35_jax import compare_hf, convert, dryrun
from qwen35_jax.checkpoint.orbax_io import save_model
from qwen35_jax.cli import command
from qwen35_jax.config import ModelConfig
from qwen35_jax.loading import load_model
from qwen35_jax.nn.model import Qwen35
from train import demo, finetune, plot
from train.config import TrainConfig, TrainConfigError


def params(model) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def assert_same_params(a, b):
    pa, pb = params(a), params(b)
    assert len(pa) == len(pb) and all(np.array_equal(x, y) for x, y in zip(pa, pb))


# ---- relative paths ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory, bpe_folder):
    """(root, model): a tiny model saved as an Orbax checkpoint at root/runs/final with a BPE tokenizer."""
    root = tmp_path_factory.mktemp("relative")
    model = Qwen35(ModelConfig.from_hf("tiny-dense", vocab_size=512), jnp.float32, nnx.Rngs(0))
    save_model(model, root / "runs" / "final", assets_from=bpe_folder)
    return root, model


def test_orbax_checkpoint_loads_by_a_relative_path(saved, monkeypatch, capsys):
    """Loading goes through Orbax, which reads absolute paths only: every loader must resolve the path."""
    root, model = saved
    monkeypatch.chdir(root)
    assert_same_params(load_model("runs/final"), model)
    assert_same_params(finetune.build_model(TrainConfig(model="runs/final")), model)  # finetune model=...
    assert convert.main(["--to-hf", "--ckpt", "runs/final", "--out", "hf"]) == 0
    assert_same_params(load_model("hf"), model)
    assert generate.main(["--model", "runs/final", "--prompt", "The quick", "--temperature", "0",
                          "--max-new-tokens", "3", "--max-len", "32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(result["token_ids"]) == 3


def test_export_never_replaces_a_folder_unasked(saved, tmp_path, capsys):
    root, _ = saved
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["--to-hf", "--ckpt", str(root / "runs" / "final"), "--out", str(out)]
    assert convert.main(argv) == 2 and "already exists" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    assert convert.main([*argv, "--overwrite"]) == 0
    assert (out / "config.json").is_file() and not (out / "notes.txt").exists()


# ---- one-line errors ---------------------------------------------------------------------------------------
DRYRUN = ["--devices", "1", "--mesh", "tensor=1"]


@pytest.mark.parametrize("main, argv, message", [
    (convert.main, ["--to-hf", "--ckpt", "nowhere", "--out", "x"], r"nowhere: not an Orbax checkpoint"),
    (generate.main, ["--model", "nowhere", "--prompt", "x"], r"^error: nowhere: not a checkpoint folder"),
    (finetune.main, ["--config", "nowhere.yaml"], r"^error: nowhere\.yaml: cannot read the training config"),
    (finetune.main, ["--config", "demo", "--no-progress", "learning_rte=1"],
     r"^error: command-line override 'learning_rte=1': unknown config key\(s\) \['learning_rte'\] "
     r"\(did you mean 'learning_rate'\?\)"),
    (demo.main, ["--out", "d", "stesp=10"], r"^error: command-line override 'stesp=10': unknown config key"),
    (demo.main, ["--out", "d", "steps=ten"], r"^error: command-line override 'steps=ten': config key 'steps': "
                                             r"expected int, got 'ten'"),
    (demo.main, ["--out", "d", "--digits", "1"], r"--digits 1 allows 100 distinct problems"),
    (dryrun.main, ["--model", "nope", *DRYRUN], r"^error: no config at 'nope'"),
    (compare_hf.main, ["--hf-dir", "nowhere"], r"^error: nowhere: no such folder"),
])
def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys, main, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "d").exists()  # the demo checks its arguments before writing anything


def test_config_errors_name_their_source(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("steps: 3\nlearning_rte: 0.1\n")
    with pytest.raises(TrainConfigError, match=rf"^{re.escape(str(config))}: unknown config key\(s\) "):
        TrainConfig.load(config)
    config.write_text("steps: three\n")
    with pytest.raises(TrainConfigError, match=rf"^{re.escape(str(config))}: config key 'steps': expected int"):
        TrainConfig.load(config)
    config.write_text("steps: 3\n")
    with pytest.raises(TrainConfigError) as error:
        TrainConfig.load(config, ["learning_rte=0.1"])
    assert str(error.value).startswith("command-line override 'learning_rte=0.1'") and str(config) not in \
        str(error.value).split(";")[0]
    with pytest.raises(TrainConfigError, match=r"^command-line override 'remat=fulll': config key 'remat'"):
        TrainConfig.load(config, ["remat=fulll"])
    with pytest.raises(TrainConfigError, match=r"^command-line override 'steps': expected key=value"):
        TrainConfig.load(config, ["steps"])


def test_command_helper_exit_statuses(monkeypatch, capsys):
    class Diverged(RuntimeError):
        pass

    @command(failures=(Diverged,))
    def main(argv=None):
        kind = argv[0]
        if kind == "missing":
            open("/nonexistent/file.txt")
        raise {"value": ValueError("bad value"), "diverged": Diverged("diverged"), "bug": KeyError("k")}[kind]
    assert main(["value"]) == 2 and capsys.readouterr().err == "error: bad value\n"
    assert main(["missing"]) == 2 and capsys.readouterr().err == \
        "error: /nonexistent/file.txt: No such file or directory\n"
    assert main(["diverged"]) == 1 and capsys.readouterr().err == "error: diverged\n"
    with pytest.raises(KeyError):  # a bug keeps its traceback
        main(["bug"])
    monkeypatch.setenv("QWEN35_TRACEBACK", "1")
    with pytest.raises(ValueError, match="bad value"):
        main(["value"])


# ---- overrides anywhere, --help ----------------------------------------------------------------------------
def test_overrides_anywhere_on_the_command_line(monkeypatch, capsys):
    seen = {}

    def fake_run(tc, resume, progress):
        seen.update(tc=tc, resume=resume, progress=progress)
        return {"step": 0}
    monkeypatch.setattr(finetune, "run", fake_run)
    assert finetune.main(["--config", "demo", "--no-progress", "output_dir=A", "--resume", "export_hf=B"]) == 0
    assert seen["tc"].output_dir == "A" and seen["tc"].export_hf == "B" and seen["resume"] and not seen["progress"]
    args = demo.build_parser().parse_intermixed_args(["steps=3", "--out", "o", "eval_every=1", "--seed", "2"])
    assert args.overrides == ["steps=3", "eval_every=1"] and args.out == "o" and args.seed == 2


@pytest.mark.parametrize("main, needles", [
    (generate.main, ["(default: 256)", "(default: the preset's, see below)",
                     "plain prompts and --no-thinking: temperature 0.7, top_p 0.8, top_k 20, presence_penalty 1.5",
                     "--chat / --interactive (thinking): temperature 0.6, top_p 0.95, top_k 20"]),
    (finetune.main, ["learning_rate = 0.0001", "steps = 100"]),
    (demo.main, ["(default: runs/demo)", "(default: 20000)"]),
    (convert.main, ["(default: bfloat16)"]),
    (dryrun.main, ["(default: train)"]),
    (compare_hf.main, ["(default: float32)", "(default: 64)"]),
])
def test_help_shows_defaults(capsys, main, needles):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert done.value.code == 0 and all(n in out for n in needles), out


# ---- the demo ------------------------------------------------------------------------------------------------
def test_demo_never_replaces_an_earlier_run_unasked(tmp_path, capsys):
    (tmp_path / "out" / "run").mkdir(parents=True)
    (tmp_path / "out" / "run" / "notes.txt").write_text("mine")
    assert demo.main(["--out", str(tmp_path / "out"), "steps=1"]) == 2
    assert "pass --overwrite to replace it" in capsys.readouterr().err
    assert (tmp_path / "out" / "run" / "notes.txt").read_text() == "mine"


def test_demo_end_to_end_then_the_printed_command(tmp_path, monkeypatch, capsys):
    """A few steps of the demo, replacing an earlier run with --overwrite, from a relative --out: the run writes
    loss.png and prints a command that works as printed (a relative checkpoint path)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "demo" / "run").mkdir(parents=True)
    assert demo.main(["--out", "runs/demo", "--digits", "2", "--train-problems", "64", "--test-problems", "4",
                      "steps=2", "batch_size=8", "warmup_steps=1", "eval_every=1", "save_every=2", "log_every=1",
                      "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "runs/demo/run/loss.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "final checkpoint: runs/demo/run/final" in out
    command_line = next(line for line in out.splitlines() if line.startswith("try it:"))
    argv = shlex.split(command_line.removeprefix("try it:"))
    assert argv[:3] == ["python", "-m", "infer.generate"] and "runs/demo/run/final" in argv
    assert generate.main(argv[3:]) == 0


# ---- loss.png --------------------------------------------------------------------------------------------------
@pytest.fixture
def log(tmp_path):
    entries = [{"step": s, "loss": 3.0 / s} | ({"eval_loss": 3.5 / s} if s % 5 == 0 else {}) for s in range(1, 11)]
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path


def test_loss_plot_is_a_png_beside_the_log(log):
    assert plot.write_loss_plot(log) == log.with_name("loss.png")
    assert log.with_name("loss.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert sorted(p.name for p in log.parent.iterdir()) == ["log.jsonl", "loss.png"]  # no partial file left


def test_loss_plot_without_matplotlib_warns_once(log, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    plot._figure_class.cache_clear()
    try:
        with pytest.warns(UserWarning, match="matplotlib is not installed"):
            assert plot.write_loss_plot(log) is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert plot.write_loss_plot(log) is None
        assert not log.with_name("loss.png").exists()
    finally:
        plot._figure_class.cache_clear()
