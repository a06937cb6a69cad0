"""`python -m qwen35_jax.dryrun ...`: the sharding dry-run's entry point (see `train/dryrun.py`, where it lives).

The dry-run compiles the steps users run: `train.step.Trainer`'s train step and `infer.Engine`'s prefill and
decode steps, so it sits above both. This module only hands the command line over at run time; nothing in the
`qwen35_jax` package imports `train` or `infer`.
"""

import sys


def main(argv=None) -> int:
    import importlib
    return importlib.import_module("train.dryrun").main(argv)


if __name__ == "__main__":
    sys.exit(main())
