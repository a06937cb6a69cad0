"""Loading an HF safetensors checkpoint folder into the NNX model through the name table."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen35_jax.checkpoint.names import MTP_PREFIX, Rule, checkpoint_rules, detect_layout, has_mtp_tensors, is_skipped
from qwen35_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsFolder
from qwen35_jax.config import ModelConfig
from qwen35_jax.nn.model import Qwen35

log = logging.getLogger(__name__)


def abstract_model(cfg: ModelConfig, dtype) -> tuple[nnx.GraphDef, nnx.State, dict]:
    """(graphdef, abstract state, {path: abstract Variable of that state}) of the model, nothing allocated;
    setting values on the Variables fills the state for `nnx.merge(graphdef, state)`."""
    graphdef, state = nnx.split(Qwen35.abstract(cfg, dtype))
    return graphdef, state, {tuple(p): v for p, v in nnx.to_flat_state(state)}


def layer_shape(variable, rule: Rule) -> tuple[int, ...]:
    shape = tuple(variable.get_value().shape)
    return shape[1:] if rule.period is not None else shape


def without_missing_mtp(cfg: ModelConfig, has_mtp: bool, where) -> ModelConfig:
    """The config the checkpoint's tensors can fill: `cfg`, or `cfg` with its MTP block off (and a warning
    saying so) when it has one but the checkpoint holds no `mtp.*` tensors (an HF fine-tune, say)."""
    if not cfg.mtp_num_hidden_layers or has_mtp:
        return cfg
    log.warning("%s: the config has an MTP block (mtp_num_hidden_layers=%d) but the checkpoint holds no %s* "
                "tensors: loading it without MTP", where, cfg.mtp_num_hidden_layers, MTP_PREFIX)
    return dataclasses.replace(cfg, mtp_num_hidden_layers=0)


def check_tensors(folder: SafetensorsFolder, rules: list[Rule], variables: dict, cfg: ModelConfig) -> None:
    """Raises one CheckpointError listing every missing, unexpected and mis-shaped tensor."""
    present = set(folder.names())
    expected, problems = set(), []
    for rule in rules:
        expected.update(rule.hf)
        missing = [n for n in rule.hf if n not in present]
        problems += [f"missing tensor {n}" for n in missing]
        if missing:
            continue
        ours = [jax.ShapeDtypeStruct(layer_shape(variables[p], rule), jnp.float32) for p in rule.ours]
        for name, want in zip(rule.hf, jax.eval_shape(rule.to_hf, *ours)):
            got = folder.shape(name)
            if tuple(got) != tuple(want.shape):
                problems.append(f"tensor {name} in {folder.file_of(name).path.name} has shape {list(got)}, "
                                f"expected {list(want.shape)} from config.json")
    problems += [f"unexpected tensor {n} in {folder.file_of(n).path.name}"
                 for n in sorted(present - expected) if not is_skipped(n, cfg)]
    if problems:
        shown = "\n  ".join(problems[:50]) + (f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else "")
        raise CheckpointError(f"{folder.folder}: checkpoint does not match its config ({len(problems)} problems):"
                              f"\n  {shown}")


def load_hf(path: str | Path, dtype=jnp.float32, cfg: ModelConfig | None = None) -> Qwen35:
    """Loads an HF folder (config.json + *.safetensors [+ index]) into a `Qwen35` of `dtype`, its MTP block
    included when the config has one and the folder holds its tensors (`without_missing_mtp`)."""
    path = Path(path)
    cfg = cfg or ModelConfig.from_hf(path)
    folder = SafetensorsFolder(path)
    cfg = without_missing_mtp(cfg, has_mtp_tensors(folder.names()), path)
    rules = checkpoint_rules(cfg, *detect_layout(folder.names()))
    graphdef, state, variables = abstract_model(cfg, dtype)
    check_tensors(folder, rules, variables, cfg)
    arrays = {p: np.empty(v.get_value().shape, v.get_value().dtype) for p, v in variables.items()}
    for rule in rules:
        values = rule.to_ours(*(folder.get(n) for n in rule.hf))
        for p, value in zip(rule.ours, values):
            target = arrays[p] if rule.period is None else arrays[p][rule.period]
            target[...] = value.astype(target.dtype)
    unfilled = sorted(set(variables) - {p for r in rules for p in r.ours})
    assert not unfilled, f"name table misses parameters {unfilled}"
    for p, v in variables.items():
        v.set_value(jnp.asarray(arrays.pop(p)))
    return nnx.merge(graphdef, state)
