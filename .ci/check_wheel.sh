#!/usr/bin/env bash
# A non-editable install works: build the wheel, install it into a clean venv, and from outside the repo load
# every bundled model preset, train recipe and benchmark config, and run one console script.
#   PYTHON=python3.12 CONSTRAINTS= bash .ci/check_wheel.sh   (defaults: python3, .ci/constraints-py311.txt)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
constraints="${CONSTRAINTS-$repo/.ci/constraints-py311.txt}"
work="$(mktemp -d "${TMPDIR:-/tmp}/qwen35-wheel-check.XXXXXX")"
keep_build="$([ -e "$repo/build" ] && echo yes || true)"  # setuptools builds in the tree: remove what it adds
trap 'rm -rf "$work"; [ -n "$keep_build" ] || rm -rf "$repo/build"' EXIT

"$python" -m pip wheel -q --no-deps "$repo" -w "$work/wheel"
"$python" -m venv "$work/venv"
"$work/venv/bin/pip" install -q "$work"/wheel/*.whl ${constraints:+-c "$constraints"}

# the names the repo holds; the installed package must list exactly these
export EXPECT_PRESETS="$(cd "$repo/qwen35_jax/presets" && ls *.json | sed 's/\.json$//' | sort | tr '\n' ' ')"
export EXPECT_RECIPES="$(cd "$repo/train/recipes" && ls *.yaml | sed 's/\.yaml$//' | sort | tr '\n' ' ')"
export EXPECT_BENCH="$(cd "$repo/benchmarks/configs" && ls *.json | sed 's/\.json$//' | sort | tr '\n' ' ')"
cd "$work"
"$work/venv/bin/python" - <<'PY'
import os
import qwen35_jax
from benchmarks.common import bench_config, bench_config_names
from qwen35_jax.config import ModelConfig, preset_names
from train.config import TrainConfig, recipe_names

assert "site-packages" in qwen35_jax.__file__, f"not the installed package: {qwen35_jax.__file__}"
for label, found, expected in [("presets", preset_names(), os.environ["EXPECT_PRESETS"]),
                               ("recipes", recipe_names(), os.environ["EXPECT_RECIPES"]),
                               ("benchmark configs", bench_config_names(), os.environ["EXPECT_BENCH"])]:
    assert list(found) == expected.split(), f"installed {label} {list(found)} != repo's {expected.split()}"
from importlib.metadata import version
print("installed:", ", ".join(f"{p} {version(p)}" for p in ("qwen35-jax", "jax", "jaxlib", "flax", "optax",
                                                             "orbax-checkpoint")))
for name in preset_names():
    cfg = ModelConfig.from_hf(name)
    print(f"preset {name}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, experts {cfg.num_experts}")
for name in recipe_names():
    print(f"recipe {name}: model {TrainConfig.load(name).model}")
for name in bench_config_names():
    print(f"benchmark config {name}: hidden {ModelConfig.from_hf(bench_config(name)).hidden_size}")
PY
"$work/venv/bin/qwen35-dryrun" --help > /dev/null
echo "wheel check passed: $(ls "$work"/wheel)"
