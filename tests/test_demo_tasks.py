"""The demo's data (train.demo): `--task series` problems are right, held out from training and tokenizable;
`--task add` data is byte for byte what it was before tasks existed; bad flag combinations fail up front. No
training here (tests/test_cli_ux.py runs the demo end to end)."""

from __future__ import annotations

import argparse
import hashlib
import random

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from qwen35_jax.config import ModelConfig
from qwen35_jax.nn.model import Qwen35
from qwen35_jax.tokenizer import Tokenizer
from train import demo
from train.config import RECIPE_DIR, TrainConfig


def demo_args(task: str, **flags) -> argparse.Namespace:
    """The demo's parsed arguments for `--task task` and `flags` (seed 0, 3 digits, 500 held out), task defaults
    applied and counts checked."""
    argv = ["--task", task] + [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    args = demo.apply_task_defaults(demo.build_parser().parse_intermixed_args(argv))
    demo.check_problem_counts(args)
    return args


@pytest.fixture(scope="module")
def series():
    """(held-out, training) problems of the series task with its defaults."""
    return demo.held_out_and_training(demo_args("series"))


def test_series_answer_by_hand():
    assert demo.series_answer(12, 3) == "15,18,21,24,27,30,33,36"
    assert demo.series_answer(995, 9) == "1004,1013,1022,1031,1040,1049,1058,1067"
    assert demo.make_problems(1, 3, random.Random(0), task="series")[0] == ("864+7:", "871,878,885,892,899,906,913,920")


def test_series_problems_recomputed(series):
    """Every problem "a+s:" -> 8 terms, recomputed from scratch: a below 1000, s in 1..9, term k = a + k s."""
    for prompt, answer in [*series[0], *series[1]]:
        assert prompt.endswith(":") and prompt.count("+") == 1
        a, s = (int(x) for x in prompt[:-1].split("+"))
        assert 0 <= a < 1000 and 1 <= s <= 9
        terms = [a]
        for _ in range(8):
            terms.append(terms[-1] + s)
        assert answer == ",".join(map(str, terms[1:])), prompt


def test_series_held_out_set_is_disjoint_from_training(series):
    test, train = series
    assert (len(test), len(train)) == (500, demo.TASKS["series"].train_problems)
    held_out, trained = ({demo.operands(p) for p, _ in rows} for rows in series)
    assert len(held_out) == len(test) and len(trained) == len(train)  # distinct within each set, too
    assert not held_out & trained
    assert not {p for p, _ in test} & {p for p, _ in train}


def test_series_problems_fit_the_recipe(series):
    """Prompt + answer + EOS of the longest problem fits one packed row of demo-series.yaml."""
    longest = max(len(p) + len(a) + 1 for p, a in [*series[0], *series[1]])
    assert longest <= TrainConfig.load(RECIPE_DIR / "demo-series.yaml").seq_len


def test_series_tokenizer_round_trips_its_alphabet(tmp_path, series):
    demo.train_tokenizer(tmp_path, series[1])
    tok = Tokenizer.load(tmp_path)
    alphabet = "0123456789+:,"
    unknown = tok.token_id("<unk>")
    ids = tok.encode(alphabet)
    assert len(ids) == len(alphabet) and unknown not in ids and tok.decode(ids) == alphabet
    for prompt, answer in series[0][:50]:
        assert tok.decode(tok.encode(prompt + answer)) == prompt + answer
    model_vocab = TrainConfig.load(RECIPE_DIR / "demo-series.yaml").model_overrides["vocab_size"]
    assert tok.vocab_size == len(alphabet) + 3 <= model_vocab  # + <unk>, <s>, </s>


def test_the_tokenizer_refuses_to_drop_characters(tmp_path):
    problems = [(f"{c}+1=", "abcdefghij") for c in "0123456789"]  # 10 + 3 + 10 characters > 14
    with pytest.raises(ValueError, match=r"holds at most 14 characters; the problems' \[.*\] are left out"):
        demo.train_tokenizer(tmp_path, problems)


def test_generation_budget_follows_the_longest_answer(tmp_path, series):
    demo.train_tokenizer(tmp_path, series[1])
    tok = Tokenizer.load(tmp_path)
    assert demo.generation_budget(tok, [("1+2:", "3,5"), ("999+9:", "1008,1017")]) == (10, 16)
    new_tokens, max_len = demo.generation_budget(tok, series[0])
    assert new_tokens == max(len(a) for _, a in series[0]) + 1 and max_len <= 64  # the README benchmark's --max-len


def sha256(problems) -> str:
    return hashlib.sha256("".join(f'{{"prompt": "{p}", "completion": "{a}"}}\n' for p, a in problems)
                          .encode()).hexdigest()


def test_add_data_is_unchanged():
    """The default task's files (seed 0) as the demo wrote them before --task existed: first rows and the
    sha256 of test.jsonl and train.jsonl."""
    test, train = demo.held_out_and_training(demo_args("add"))
    assert test[:4] == [("97+5=", "102"), ("65+51=", "116"), ("61+74=", "135"), ("8+4=", "12")]
    assert train[:4] == [("568+30=", "598"), ("44+60=", "104"), ("313+52=", "365"), ("609+721=", "1330")]
    assert sha256(test) == "0d42cff8bb0f6f56e67b30068b3a43900f5cf6def33ef3e6d61d309cb6010321"
    assert sha256(train) == "e09c015667fa4b16fb764d586e07d69ce58a1c7d1f18d785629bc4260eba703c"
    assert demo.make_problems(5, 2, random.Random(1)) == [("9+4=", "13"), ("7+60=", "67"), ("26+7=", "33"),
                                                          ("6+77=", "83"), ("7+92=", "99")]


def test_task_defaults():
    assert (demo_args("add").out, demo_args("add").train_problems) == ("runs/demo", 20000)
    assert demo_args("series").out == "runs/demo-series"
    args = demo.apply_task_defaults(demo.build_parser().parse_intermixed_args(["--task", "series", "--mtp"]))
    assert args.out == "runs/demo-series-mtp"
    args = demo.apply_task_defaults(demo.build_parser().parse_intermixed_args(["--mtp"]))
    assert (args.out, args.train_problems) == ("runs/demo-mtp", 20000)
    assert demo_args("series", train_problems=100, out="o").train_problems == 100


def test_a_recipe_flag_names_the_default_out():
    args = demo.apply_task_defaults(demo.build_parser().parse_intermixed_args(
        ["--task", "series", "--recipe", "demo-series-wide", "--mtp"]))
    assert (args.out, args.recipe) == ("runs/demo-series-wide-mtp", "demo-series-wide")
    assert demo_args("series", recipe="/some/where/mine.yaml").out == "runs/mine"
    assert demo_args("series", recipe="demo-series-wide", out="o").out == "o"


def weight_megabytes(tc: TrainConfig) -> float:
    """Float32 megabytes of the trunk's decoder layers (no embeddings, lm_head or MTP block) of a recipe's model."""
    cfg = ModelConfig.from_hf(tc.model, **tc.model_overrides)
    state = nnx.state(nnx.eval_shape(lambda: Qwen35(cfg, jnp.float32, nnx.Rngs(0))), nnx.Param)
    sizes = [v.size for path, v in jax.tree_util.tree_flatten_with_path(state)[0]
             if any(getattr(k, "key", None) == "layers" for k in path)]
    return 4 * sum(sizes) / 1e6


def test_the_wide_recipe_is_dense_and_outgrows_the_cpu_caches(series):
    """demo-series-wide.yaml's point: a dense model on the series rows whose decoder weights (~61 MB, as its comment
    says) are beyond a 32 MB L3, where the demo model's fit."""
    wide = TrainConfig.load("demo-series-wide")
    assert (wide.model, wide.seq_len, wide.batch_size) == ("tiny-dense", 128, 16)
    assert 58 < weight_megabytes(wide) < 64
    assert weight_megabytes(TrainConfig.load("demo-series")) < 32
    assert max(len(p) + len(a) + 1 for p, a in [*series[0], *series[1]]) <= wide.seq_len


def test_the_series_recipe_trains_the_demo_model():
    add, series = (TrainConfig.load(RECIPE_DIR / f"{name}.yaml") for name in ("demo", "demo-series"))
    assert (series.model, series.model_overrides) == (add.model, add.model_overrides)


@pytest.mark.parametrize("argv, message", [
    (["--task", "series", "--digits", "1"], "--task series --digits 1 allows 90 distinct problems, fewer than "
                                            "--train-problems 8000 + --test-problems 500"),
    (["--task", "series", "--train-problems", "8600"], "--task series --digits 3 allows 9000 distinct problems"),
    (["--task", "series", "--test-problems", "0"], "--train-problems and --test-problems must be >= 1"),
])
def test_bad_series_flags_fail_before_writing(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert demo.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert not any(tmp_path.iterdir())


def test_an_unknown_task_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as done:
        demo.main(["--task", "serie"])
    assert done.value.code == 2 and "invalid choice: 'serie' (choose from" in capsys.readouterr().err
