"""The optimizer: AdamW with warmup + cosine decay, selective weight decay, clipping, frozen groups."""

from __future__ import annotations

import re

import jax
import optax
from flax import nnx


def param_names(params) -> dict:
    """A tree like `params` whose leaves are the parameters' path names, e.g.
    "decoder/periods/layers/0/mlp/router" (what `frozen` patterns and logs refer to)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path), params)


def _layer_ndim(variable) -> int:
    """Dimensions of one layer's parameter (the stacked `layers` axis not counted)."""
    axes = variable.get_metadata().get("out_sharding") or ()
    return variable.get_value().ndim - sum(1 for a in axes if a == "layers")


def is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def plain_values(variables):
    """nnx State of Variables -> the same State holding the bare arrays (what jit and optax see)."""
    return jax.tree.map(lambda v: v.get_value(), variables, is_leaf=is_variable)


def matrix_mask(variables) -> dict:
    """True for matrices: parameters with >= 2 dimensions per layer (the stacked `layers` axis not counted)."""
    return jax.tree.map(lambda v: _layer_ndim(v) >= 2, variables, is_leaf=is_variable)


def decay_mask(variables) -> dict:
    """True for parameters that get weight decay: matrices that are not norm weights."""
    names = param_names(plain_values(variables))
    return jax.tree.map(lambda name, m: m and "norm" not in name, names, matrix_mask(variables))


def frozen_mask(params, patterns: list[str]) -> dict:
    """True for parameters whose path name matches any regex in `patterns` (re.search). A pattern that is not a
    regex, matches no parameter, or (with the others) freezes everything raises TrainConfigError."""
    from train.config import TrainConfigError
    try:
        compiled = [re.compile(p) for p in patterns]
    except (re.error, TypeError) as e:
        raise TrainConfigError(f"frozen={patterns}: not a list of regular expressions ({e})") from None
    names = jax.tree.leaves(param_names(params))
    unused = [c.pattern for c in compiled if not any(c.search(n) for n in names)]
    if unused:
        raise TrainConfigError(f"frozen: {unused} match no parameter; names look like {names[:3]}")
    mask = jax.tree.map(lambda name: any(c.search(name) for c in compiled), param_names(params))
    if patterns and all(jax.tree.leaves(mask)):
        raise TrainConfigError(f"frozen={patterns}: these patterns freeze every parameter")
    return mask


def learning_rate_schedule(tc) -> optax.Schedule:
    """Linear warmup from 0 to tc.learning_rate over tc.warmup_steps, then cosine decay to
    tc.learning_rate * tc.min_lr_ratio at tc.steps."""
    return optax.warmup_cosine_decay_schedule(
        0.0, tc.learning_rate, tc.warmup_steps, max(tc.steps, tc.warmup_steps + 1),
        end_value=tc.learning_rate * tc.min_lr_ratio)


def make_optimizer(tc, variables) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay on `decay_mask` params) after global-norm clipping; parameters matching
    tc.frozen get no update at all (their gradients are not part of the clipped norm either).

    variables: the model's nnx State of Variables (their axis metadata decides what is a matrix)."""
    plain = plain_values(variables)
    mask = decay_mask(variables)
    train = optax.chain(
        optax.clip_by_global_norm(tc.max_grad_norm) if tc.max_grad_norm > 0 else optax.identity(),
        optax.adamw(learning_rate_schedule(tc), b1=tc.adam_b1, b2=tc.adam_b2, eps=tc.adam_eps,
                    weight_decay=tc.weight_decay, mask=mask))
    if not tc.frozen:
        return train
    labels = jax.tree.map(lambda f: "frozen" if f else "train", frozen_mask(plain, tc.frozen))
    return optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, labels)
