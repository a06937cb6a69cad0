"""`python -m train.demo`: train a tiny hybrid Qwen3.5 (Gated DeltaNet + attention + MoE) from scratch on CPU to
add multi-digit numbers, then answer held-out problems with the inference engine and report exact-match accuracy.

Everything is made here: the problems (JSON lines), a SentencePiece tokenizer trained on them, the model (random
init from the bundled recipe train/recipes/demo.yaml), Orbax checkpoints, the final model checkpoint, the generations.
`--mtp` trains the same model with an MTP block beside it (a draft model for speculative decoding): the recipe
plus `model_overrides: {mtp_num_hidden_layers: 1}` and `mtp_loss_weight` (MTP_LOSS_WEIGHT unless overridden).
`--task series` asks for a long answer instead: "a+s:" -> the next SERIES_TERMS terms of the arithmetic series,
"a+s,a+2s,...,a+8s" (about 30 tokens, where an addition's answer has 1-5), which gives MTP speculative decoding
room to accept several drafts a step; its recipe is train/recipes/demo-series.yaml (the same model).
`--recipe NAME` trains another recipe's model on the task (e.g. demo-series-wide: 8 dense layers, hidden 384, whose
decode reads its weights from memory as a real model's does, for speculative decoding speed figures).
"""

from __future__ import annotations

import dataclasses
import json
import random
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from qwen35_jax.cli import argument_parser, command
from train.config import RECIPE_DIR, TrainConfig
from train.finetune import TrainingDiverged, run


SERIES_TERMS = 8  # --task series: the terms after "a+s:" in an answer


def add_operands(rng: random.Random, digits: int) -> tuple[int, int]:
    """(a, b) for "a+b=": each operand's digit count drawn in 1..digits, then its value."""
    a, b = (rng.randrange(10 ** rng.randint(1, digits)) for _ in range(2))
    return a, b


def series_operands(rng: random.Random, digits: int) -> tuple[int, int]:
    """(a, s) for "a+s:": a uniform below 10**digits, the step s in 1..9. Uniform rather than add's digit count
    first: only 90 series start at a one-digit a, so that draw would put most of them in the held-out set (drawn
    first) and leave training almost none."""
    return rng.randrange(10 ** digits), rng.randint(1, 9)


def series_answer(a: int, s: int) -> str:
    """The SERIES_TERMS terms after a, step s, comma-separated: "a+s,a+2s,..."."""
    return ",".join(str(a + k * s) for k in range(1, SERIES_TERMS + 1))


@dataclasses.dataclass(frozen=True)
class Task:
    """A demo task: problems "{x}+{y}{mark}" -> answer(x, y) from two integers drawn for --digits."""
    mark: str                                              # the prompt's last character
    draw: Callable[[random.Random, int], tuple[int, int]]  # (x, y) for --digits
    answer: Callable[[int, int], str]
    possible: Callable[[int], int]                         # how many distinct (x, y) --digits allows
    train_problems: int                                    # the default --train-problems
    recipe: str                                            # its bundled recipe (train/recipes/NAME.yaml)
    out: str                                               # the default --out ("-mtp" added with --mtp)
    try_it: tuple[str, int]                                # the printed `infer.generate` prompt, --max-new-tokens


TASKS = {
    "add": Task("=", add_operands, lambda a, b: str(a + b), lambda digits: 10 ** (2 * digits), 20000, "demo",
                "runs/demo", ("12+34=", 8)),
    "series": Task(":", series_operands, series_answer, lambda digits: 9 * 10 ** digits, 8000, "demo-series",
                   "runs/demo-series", ("12+3:", 40)),
}


def operands(prompt: str) -> tuple[int, int]:
    """The (x, y) that a problem's prompt "x+y=" or "x+y:" was made from."""
    x, y = prompt[:-1].split("+")
    return int(x), int(y)


def make_problems(n: int, digits: int, rng: random.Random, exclude: set = frozenset(),
                  task: str = "add") -> list[tuple[str, str]]:
    """n distinct (prompt, answer) pairs of TASKS[task] for --digits (add: "a+b=" -> "c"), none made from an (x, y)
    in `exclude`."""
    kind = TASKS[task]
    seen, problems = set(exclude), []
    while len(problems) < n:
        x, y = kind.draw(rng, digits)
        if (x, y) not in seen:
            seen.add((x, y))
            problems.append((f"{x}+{y}{kind.mark}", kind.answer(x, y)))
    return problems


def held_out_and_training(args) -> tuple[list, list]:
    """(--test-problems held-out problems, --train-problems training problems), disjoint in (x, y), from --seed."""
    rng = random.Random(args.seed)
    test = make_problems(args.test_problems, args.digits, rng, task=args.task)
    return test, make_problems(args.train_problems, args.digits, rng, {operands(p) for p, _ in test}, args.task)


def write_jsonl(path: Path, problems) -> None:
    path.write_text("".join(json.dumps({"prompt": p, "completion": a}) + "\n" for p, a in problems))


TOKENIZER_VOCAB_LIMIT = 17  # a char model's pieces are <unk>, <s>, </s> and the characters; SentencePiece drops
                            # the rarest characters beyond this, which train_tokenizer refuses


def train_tokenizer(folder: Path, problems) -> None:
    """A SentencePiece character model trained on the problems (their characters and EOS </s>), written to the
    folder with a generation_config.json naming EOS. ValueError if a character of the problems is left out."""
    import sentencepiece as spm
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text("".join(p + a + "\n" for p, a in problems))
    spm.SentencePieceTrainer.Train(input=str(corpus), model_prefix=str(folder / "tokenizer"), model_type="char",
                                   vocab_size=TOKENIZER_VOCAB_LIMIT, character_coverage=1.0, add_dummy_prefix=False,
                                   minloglevel=2)
    corpus.unlink()
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    missing = sorted({c for p, a in problems for c in p + a} - {sp.id_to_piece(i) for i in range(sp.vocab_size())})
    if missing:
        raise ValueError(f"the demo tokenizer holds at most {TOKENIZER_VOCAB_LIMIT - 3} characters; the problems' "
                         f"{missing} are left out")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": sp.eos_id()}))


def generation_budget(tokenizer, problems) -> tuple[int, int]:
    """(max_new_tokens, max_len) for greedy answers to the problems: the longest answer's tokens plus one (its EOS,
    or the token that shows an answer running on), after the longest prompt."""
    new_tokens = max(len(tokenizer.encode(a)) for _, a in problems) + 1
    return new_tokens, max(len(tokenizer.encode(p)) for p, _ in problems) + new_tokens


def exact_match(checkpoint: Path, tokenizer: Path, problems, batch: int = 64) -> tuple[float, list]:
    """Greedy answers from the inference engine (the tokenizer folder's tokenizer), with room for the longest
    answer (`generation_budget`); (accuracy, [(prompt, expected, got)])."""
    from infer.engine import Engine
    from infer.sampling import SamplingParams
    from qwen35_jax.tokenizer import Tokenizer
    tok = Tokenizer.load(tokenizer)
    new_tokens, max_len = generation_budget(tok, problems)
    engine = Engine.load(checkpoint, max_len=max_len, prefill_chunk=16, tokenizer=tok)
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
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
                                    "are in train/recipes/demo.yaml (--task series: demo-series.yaml).")
    parser.add_argument("--task", choices=tuple(TASKS), default="add",
                        help="add: \"123+45=\" -> \"168\"; series: \"12+3:\" -> \"15,18,21,24,27,30,33,36\" (the "
                             f"next {SERIES_TERMS} terms; recipe train/recipes/demo-series.yaml)")
    parser.add_argument("--out", help="work folder (data, tokenizer, the run folder `run`); runs/demo-mtp with --mtp; "
                                      "runs/demo-series (-mtp) with --task series, runs/NAME (-mtp) with --recipe NAME "
                                      "(default: runs/demo)")
    parser.add_argument("--mtp", action="store_true",
                        help="also train an MTP block (mtp_num_hidden_layers: 1, mtp_loss_weight: "
                             f"{MTP_LOSS_WEIGHT}), for MTP speculative decoding of the final model")
    parser.add_argument("--recipe",
                        help="a bundled recipe name or YAML path in place of the task's (e.g. demo-series-wide: a "
                             "wider dense model whose decode is memory-bound, for MTP speed figures)")
    parser.add_argument("--digits", type=int, default=3,
                        help="operands (series: the first term a) have up to this many digits")
    parser.add_argument("--train-problems", type=int,
                        help=f"training problems, {TASKS['series'].train_problems} with --task series "
                             f"(default: {TASKS['add'].train_problems})")
    parser.add_argument("--test-problems", type=int, default=500, help="held-out problems (eval loss, accuracy)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the problems and the model's init")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier demo's files and run folder in --out (never done otherwise)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="overrides of the task's recipe (train/recipes/demo.yaml, demo-series.yaml; e.g. "
                             "steps=300), anywhere on the command line")
    return parser


def apply_task_defaults(args):
    """args, with the task's --train-problems and --out where they were not given."""
    task = TASKS[args.task]
    if args.train_problems is None:
        args.train_problems = task.train_problems
    if args.out is None:
        args.out = (f"runs/{Path(args.recipe).stem}" if args.recipe else task.out) + ("-mtp" if args.mtp else "")
    return args


def check_problem_counts(args) -> None:
    """ValueError unless the counts are >= 1 and --digits allows --train-problems + --test-problems distinct
    problems of --task."""
    if args.digits < 1 or args.train_problems < 1 or args.test_problems < 1:
        raise ValueError("--digits, --train-problems and --test-problems must be >= 1")
    possible = TASKS[args.task].possible(args.digits)
    if args.train_problems + args.test_problems > possible:
        raise ValueError(f"--task {args.task} --digits {args.digits} allows {possible} distinct problems, fewer than "
                         f"--train-problems {args.train_problems} + --test-problems {args.test_problems}")


def claim_output(out: Path, run_dir: Path, overwrite: bool) -> None:
    """Refuses to replace an earlier demo's files unless asked; with `overwrite`, removes the old run folder
    (the data and tokenizer files are rewritten in place)."""
    earlier = [p for p in (*(out / name for name in DEMO_FILES), run_dir) if p.exists()]
    if earlier and not overwrite:
        raise ValueError(f"{out}: holds an earlier demo ({', '.join(str(p) for p in earlier)}); pass --overwrite "
                         "to replace it, or choose another --out")
    if run_dir.exists():
        shutil.rmtree(run_dir)


def next_steps(final: Path, run_dir: Path, mtp: bool = False, task: str = "add") -> str:
    """Where the model is and a command to try it on the task (with the MTP block: speculative decoding, 3 drafts a
    step)."""
    model = shlex.quote(str(final))
    prompt, new_tokens = TASKS[task].try_it
    return (f"final checkpoint: {final}   (loss curve: {run_dir / 'loss.png'})\n"
            f"try it:  python -m infer.generate --model {model} --prompt \"{prompt}\" --temperature 0 "
            f"--max-new-tokens {new_tokens}{' --speculative 3' if mtp else ''}")


@command(failures=(TrainingDiverged,))
def main(argv=None) -> int:
    args = apply_task_defaults(build_parser().parse_intermixed_args(argv))
    check_problem_counts(args)
    start = time.perf_counter()
    out, task = Path(args.out), TASKS[args.task]
    tc = TrainConfig.load(args.recipe or RECIPE_DIR / f"{task.recipe}.yaml",
                          [f"train_data={out / 'train.jsonl'}", f"eval_data={out / 'test.jsonl'}",
                           f"tokenizer={out / 'tokenizer'}", f"output_dir={out / 'run'}", f"seed={args.seed}",
                           *([f"mtp_loss_weight={MTP_LOSS_WEIGHT}"] if args.mtp else []), *args.overrides])
    if args.mtp:
        tc = dataclasses.replace(tc, model_overrides={**tc.model_overrides, "mtp_num_hidden_layers": 1})
    run_dir = Path(tc.output_dir)
    claim_output(out, run_dir, args.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    test, train = held_out_and_training(args)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "test.jsonl", test)
    train_tokenizer(out / "tokenizer", train)
    summary = run(tc)
    trained = time.perf_counter()
    accuracy, rows = exact_match(Path(summary["final"]), out / "tokenizer", test)
    width = max(len(a) for _, a in test) + 2
    for prompt, expected, got in rows[:5]:
        print(f"  {prompt}{got:<{width}} (expected {expected})")
    mtp = f", MTP loss {summary['mtp_loss']:.4f}" if "mtp_loss" in summary else ""
    print(f"trained {tc.steps} steps in {trained - start:.0f} s (final train loss {summary['loss']:.4f}{mtp}, held-out "
          f"loss {summary['eval_loss']:.4f}); exact-match accuracy on {len(rows)} held-out problems: "
          f"{100 * accuracy:.1f}% (total {time.perf_counter() - start:.0f} s)")
    print(next_steps(run_dir / "final", run_dir, mtp=tc.mtp_loss_weight > 0, task=args.task))
    return 0


if __name__ == "__main__":
    sys.exit(main())
