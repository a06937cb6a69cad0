"""`python -m train.demo`: train a tiny hybrid Qwen3.5 (Gated DeltaNet + attention + MoE) from scratch on CPU to
add multi-digit numbers, then answer held-out problems with the inference engine and report exact-match accuracy.

Everything is made here: the problems (JSON lines), a SentencePiece tokenizer trained on them, the model (random
init from the bundled recipe train/recipes/demo.yaml), Orbax checkpoints, the final model checkpoint, the generations.
`--mtp` trains the same model with an MTP block beside it (a draft model for speculative decoding): the recipe
plus `model_overrides: {mtp_num_hidden_layers: 1}` and `mtp_loss_weight` (MTP_LOSS_WEIGHT unless overridden).
"""

from __future__ import annotations

import dataclasses
import json
import random
import shlex
import shutil
import sys
import time
from pathlib import Path

from qwen35_jax.cli import argument_parser, command
from train.config import RECIPE_DIR, TrainConfig
from train.finetune import TrainingDiverged, run


def make_problems(n: int, digits: int, rng: random.Random, exclude: set = frozenset()) -> list[tuple[str, str]]:
    """n distinct (prompt "a+b=", answer "c") pairs with operands of 1..digits digits, none in `exclude`."""
    seen, problems = set(exclude), []
    while len(problems) < n:
        a, b = (rng.randrange(10 ** rng.randint(1, digits)) for _ in range(2))
        if (a, b) not in seen:
            seen.add((a, b))
            problems.append((f"{a}+{b}=", str(a + b)))
    return problems


def write_jsonl(path: Path, problems) -> None:
    path.write_text("".join(json.dumps({"prompt": p, "completion": a}) + "\n" for p, a in problems))


def train_tokenizer(folder: Path, problems) -> None:
    """A SentencePiece character model trained on the problems (digits, '+', '=' and EOS </s>)."""
    import sentencepiece as spm
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text("".join(p + a + "\n" for p, a in problems))
    spm.SentencePieceTrainer.Train(input=str(corpus), model_prefix=str(folder / "tokenizer"), model_type="char",
                                   vocab_size=17, character_coverage=1.0, add_dummy_prefix=False,
                                   minloglevel=2)
    corpus.unlink()
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": sp.eos_id()}))


def exact_match(checkpoint: Path, problems, batch: int = 64) -> tuple[float, list]:
    """Greedy answers from the inference engine; (accuracy, [(prompt, expected, got)])."""
    from infer.engine import Engine
    from infer.sampling import SamplingParams
    engine = Engine.load(checkpoint, max_len=32, prefill_chunk=16)
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    rows = []
    for i in range(0, len(problems), batch):
        chunk = problems[i:i + batch]
        results = engine.generate([p for p, _ in chunk], params)
        rows += [(p, a, r.text.strip()) for (p, a), r in zip(chunk, results)]
    return sum(a == got for _, a, got in rows) / len(rows), rows


MTP_LOSS_WEIGHT = 0.5  # --mtp: the MTP block's cross-entropy weight beside the main loss (a key=value overrides it)
DEMO_FILES = ("train.jsonl", "test.jsonl", "tokenizer")  # what the demo writes in --out besides the run folder


def build_parser():
    parser = argument_parser(__doc__.split("\n\n")[0], module=__name__,
                             epilog="Run `python -m train.finetune --help` for the config keys; the demo's values "
                                    "are in train/recipes/demo.yaml.")
    parser.add_argument("--out", help="work folder (data, tokenizer, the run folder `run`); runs/demo-mtp with --mtp "
                                      "(default: runs/demo)")
    parser.add_argument("--mtp", action="store_true",
                        help="also train an MTP block (mtp_num_hidden_layers: 1, mtp_loss_weight: "
                             f"{MTP_LOSS_WEIGHT}), for MTP speculative decoding of the final model")
    parser.add_argument("--digits", type=int, default=3, help="operands have up to this many digits")
    parser.add_argument("--train-problems", type=int, default=20000, help="training problems")
    parser.add_argument("--test-problems", type=int, default=500, help="held-out problems (eval loss, accuracy)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the problems and the model's init")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier demo's files and run folder in --out (never done otherwise)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="overrides of train/recipes/demo.yaml (e.g. steps=300), anywhere on the command line")
    return parser


def check_problem_counts(args) -> None:
    if args.digits < 1 or args.train_problems < 1 or args.test_problems < 1:
        raise ValueError("--digits, --train-problems and --test-problems must be >= 1")
    possible = 10 ** (2 * args.digits)
    if args.train_problems + args.test_problems > possible:
        raise ValueError(f"--digits {args.digits} allows {possible} distinct problems, fewer than --train-problems "
                         f"{args.train_problems} + --test-problems {args.test_problems}")


def claim_output(out: Path, run_dir: Path, overwrite: bool) -> None:
    """Refuses to replace an earlier demo's files unless asked; with `overwrite`, removes the old run folder
    (the data and tokenizer files are rewritten in place)."""
    earlier = [p for p in (*(out / name for name in DEMO_FILES), run_dir) if p.exists()]
    if earlier and not overwrite:
        raise ValueError(f"{out}: holds an earlier demo ({', '.join(str(p) for p in earlier)}); pass --overwrite "
                         "to replace it, or choose another --out")
    if run_dir.exists():
        shutil.rmtree(run_dir)


def next_steps(final: Path, run_dir: Path, mtp: bool = False) -> str:
    """Where the model is and a command to try it (with the MTP block: speculative decoding, 3 drafts a step)."""
    model = shlex.quote(str(final))
    return (f"final checkpoint: {final}   (loss curve: {run_dir / 'loss.png'})\n"
            f"try it:  python -m infer.generate --model {model} --prompt \"12+34=\" --temperature 0 "
            f"--max-new-tokens 8{' --speculative 3' if mtp else ''}")


@command(failures=(TrainingDiverged,))
def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    check_problem_counts(args)
    start = time.perf_counter()
    out = Path(args.out or ("runs/demo-mtp" if args.mtp else "runs/demo"))
    tc = TrainConfig.load(RECIPE_DIR / "demo.yaml",
                          [f"train_data={out / 'train.jsonl'}", f"eval_data={out / 'test.jsonl'}",
                           f"tokenizer={out / 'tokenizer'}", f"output_dir={out / 'run'}", f"seed={args.seed}",
                           *([f"mtp_loss_weight={MTP_LOSS_WEIGHT}"] if args.mtp else []), *args.overrides])
    if args.mtp:
        tc = dataclasses.replace(tc, model_overrides={**tc.model_overrides, "mtp_num_hidden_layers": 1})
    run_dir = Path(tc.output_dir)
    claim_output(out, run_dir, args.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    test = make_problems(args.test_problems, args.digits, rng)
    train = make_problems(args.train_problems, args.digits, rng, exclude={tuple(map(int, p[:-1].split("+")))
                                                                          for p, _ in test})
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "test.jsonl", test)
    train_tokenizer(out / "tokenizer", train)
    summary = run(tc)
    trained = time.perf_counter()
    accuracy, rows = exact_match(Path(summary["final"]), test)
    for prompt, expected, got in rows[:5]:
        print(f"  {prompt}{got:<6} (expected {expected})")
    mtp = f", MTP loss {summary['mtp_loss']:.4f}" if "mtp_loss" in summary else ""
    print(f"trained {tc.steps} steps in {trained - start:.0f} s (final train loss {summary['loss']:.4f}{mtp}, held-out "
          f"loss {summary['eval_loss']:.4f}); exact-match accuracy on {len(rows)} held-out problems: "
          f"{100 * accuracy:.1f}% (total {time.perf_counter() - start:.0f} s)")
    print(next_steps(run_dir / "final", run_dir, mtp=tc.mtp_loss_weight > 0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
