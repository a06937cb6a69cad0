"""LoRA: low-rank adapters on the attention / Gated DeltaNet projections, the MLP / shared expert and the routed
experts, trained with the base model frozen; merge to a full model; export in PEFT's layout.

Config (`train.config.TrainConfig.lora`): `{rank, alpha, targets: [regex, ...]}`, the targets matched (re.search)
against HF tensor names with real layer indices, as `frozen` is (`train.optim.hf_rules`):
`model.layers.3.self_attn.q_proj.weight`, `model.layers.0.linear_attn.in_proj_qkv.weight`,
`model.layers.0.mlp.shared_expert.gate_proj.weight`, `model.layers.0.mlp.experts.gate_up_proj`, ...

Granularity = HF modules, so the PEFT export is exact: one A/B pair per HF weight, over HF's fused outputs
(`in_proj_qkv` has one A [H, r] and one B [r, q+k+v], though we store q, k, v apart; `gate_proj` and `up_proj`
have their own pairs though we store them as one `gate_up`). Routed experts (HF's fused layout
`mlp.experts.gate_up_proj` (E, 2I, H), `down_proj` (E, H, I)) get one pair per expert, stacked on the expert
axis: A [E, in, r], B [E, r, out], sharded with the base weight's `experts` axis. A ~ U(+-1/sqrt(in)) (PEFT's
default kaiming-uniform(a=sqrt(5))), B = 0, so step 0 is the base model. Adapters are `nnx.LoRAParam`s, stored
per HF layer (`layers/3/self_attn/q_proj/lora_a`), independent of `scan_layers` and of the mesh.

How the adapted weights reach the model: W' = W + (alpha / r) * A @ B, a parameter transform. In training it runs
per decoder period inside the layer scan (`PeriodMerge`, handed to `Decoder.__call__` as its period_transform by
the Trainer): the adapters are stacked per period slot ([num_periods, ...], small), scanned with the stacked base,
and each period's merged weights (in the compute dtype) exist only while that period runs (under remat they are
recomputed in the backward pass, not saved), so memory holds the frozen base (stored in `param_dtype`, bfloat16
halves it) plus one period's merged weights, not a merged copy of every targeted weight. The model code, the
grouped expert matmul and the expert-parallel dispatch are untouched. `merged_params` does the same merge on the
whole parameter tree at once (export, `merge_lora`, `Trainer.model`). With bfloat16
compute the merged weight is rounded to bfloat16 (the forward differs from PEFT's unmerged x @ W + x @ A @ B by
that rounding); gradients reach A and B exactly through the merge.

`python -m train.lora merge --base CKPT --adapter DIR --out OUT`: base checkpoint (Orbax or HF folder) + a PEFT
adapter folder written by `export_peft` -> a merged model checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen35_jax.checkpoint.names import Rule
from qwen35_jax.nn.model import Qwen35
from train.optim import example_names, hf_rules, plain_values, select_names

ADAPTABLE = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj\.weight|linear_attn\.(in_proj_(qkv|z|b|a)|out_proj)"
                       r"\.weight|mlp\.(shared_expert\.)?(gate|up|down)_proj\.weight|mlp\.experts\.(gate_up|down)_proj)$")
_INPUT_AXIS = {"o_proj": None, "out_proj": None, "down_proj": "mlp"}    # default: "embed" (the hidden size)
_OUTPUT_AXIS = {"o_proj": "embed", "out_proj": "embed", "down_proj": "embed", "gate_proj": "mlp", "up_proj": "mlp",
                "gate_up_proj": "mlp"}                                  # default: None (replicated)
PEFT_PREFIX = "base_model.model."


@dataclasses.dataclass(frozen=True)
class Target:
    """One adapted HF weight: `rule.hf[index]`, of shape (out, in) or, for routed experts, (E, out, in)."""

    name: str        # HF tensor name, e.g. model.layers.3.self_attn.q_proj.weight
    rule: Rule
    index: int
    shape: tuple     # the HF weight's shape

    @property
    def key(self) -> tuple[str, ...]:
        """Where the adapter pair lives: ("layers", "3", "self_attn", "q_proj")."""
        return tuple(self.name.removeprefix("model.").removesuffix(".weight").split("."))

    @property
    def experts(self) -> int | None:
        return self.shape[0] if len(self.shape) == 3 else None

    def axes(self) -> tuple[tuple, tuple]:
        """Logical axes of A [(E,) in, r] and B [(E,) r, out]."""
        module = self.key[-1]
        lead = ("experts",) if self.experts else ()
        return (lead + (_INPUT_AXIS.get(module, "embed"), None), lead + (None, _OUTPUT_AXIS.get(module)))


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """The validated `lora` config against one model config: what is adapted, at which rank and scale."""

    rank: int
    alpha: float
    targets: tuple[Target, ...]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, cfg, lora: dict) -> LoraSpec:
        """lora: the train config's {rank, alpha, targets} (checked by `train.config`); errors name what the
        adaptable names look like when a target matches none of them."""
        rules = hf_rules(cfg)
        names = [n for r in rules for n in r.hf if ADAPTABLE.match(n)]
        from train.config import TrainConfigError
        try:
            chosen = select_names(names, list(lora["targets"]), "lora.targets")
        except TrainConfigError as e:
            raise TrainConfigError(f"{e} (adaptable: attention, Gated DeltaNet, MLP / shared-expert projections and "
                                   f"routed experts, e.g. {example_names(names)})", key="lora") from None
        _, state = nnx.split(Qwen35.abstract(cfg))
        shapes = {tuple(p): v.get_value().shape for p, v in nnx.to_flat_state(state)}
        targets = []
        for rule in rules:
            hf_shapes = jax.eval_shape(rule.to_hf, *(jax.ShapeDtypeStruct(
                shapes[p][1:] if rule.period is not None else shapes[p], jnp.float32) for p in rule.ours))
            targets += [Target(n, rule, i, tuple(s.shape)) for i, (n, s) in enumerate(zip(rule.hf, hf_shapes))
                        if n in chosen]
        return cls(int(lora["rank"]), float(lora["alpha"]), tuple(targets))


class _Pair(nnx.Module):
    def __init__(self, target: Target, rank: int, rngs: nnx.Rngs):
        *lead, _, n_in = target.shape
        out = target.shape[-2]
        a_axes, b_axes = target.axes()
        bound = n_in ** -0.5
        a = jax.random.uniform(rngs.params(), (*lead, n_in, rank), jnp.float32, -bound, bound)
        self.lora_a = nnx.LoRAParam(a, out_sharding=a_axes, eager_sharding=False)
        self.lora_b = nnx.LoRAParam(jnp.zeros((*lead, rank, out), jnp.float32), out_sharding=b_axes,
                                    eager_sharding=False)


class LoraAdapters(nnx.Module):
    """The adapters of a `LoraSpec`: float32 `nnx.LoRAParam`s lora_a [(E,) in, r], lora_b [(E,) r, out] per
    target, nested by the HF name (`adapters.layers["3"]["self_attn"]["q_proj"].lora_a`)."""

    def __init__(self, spec: LoraSpec, rngs: nnx.Rngs):
        tree = {}
        for t in spec.targets:
            node = tree
            for k in t.key[:-1]:
                node = node.setdefault(k, {})
            node[t.key[-1]] = _Pair(t, spec.rank, rngs)

        def to_dict(node):
            return nnx.Dict({k: to_dict(v) if isinstance(v, dict) else v for k, v in node.items()})
        self.layers = to_dict(tree["layers"])


def adapter_variables(spec: LoraSpec, seed: int = 0, abstract: bool = False):
    """The adapters' nnx State of LoRAParam Variables (ShapeDtypeStructs with `abstract`)."""
    build = lambda: LoraAdapters(spec, nnx.Rngs(seed))  # noqa: E731
    return nnx.state(nnx.eval_shape(build) if abstract else build(), nnx.LoRAParam)


def _pair(adapters, key):
    node = adapters
    for k in key:
        node = node[k]
    return node["lora_a"], node["lora_b"]


def hf_delta(a, b, scale: float):
    """(alpha/r) * (A @ B) in HF's (out, in) orientation: A [in, r], B [r, out] -> [out, in];
    per expert A [E, in, r], B [E, r, out] -> [E, out, in]."""
    return scale * jnp.einsum("...ir,...ro->...oi", a, b)


def _flat(tree) -> dict:
    return {tuple(getattr(k, "key", getattr(k, "idx", k)) for k in p): v
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def merged_params(spec: LoraSpec, base, adapters, dtype_of=None):
    """Base parameters (our layout, plain arrays, any dtype) + adapters (plain arrays) -> the effective parameters
    W + (alpha/r) * A @ B, one expression per base array (the deltas of a stacked array's layers stacked on its
    `layers` axis). The sum is float32; `dtype_of(path, base array)` gives each result's dtype (default: the
    base array's), so the trainer's cast to the compute dtype happens here too."""
    flat = _flat(base)
    dtype_of = dtype_of or (lambda path, x: x.dtype)
    by_rule = {}
    for t in spec.targets:
        by_rule.setdefault(id(t.rule), (t.rule, {}))[1][t.index] = t
    deltas = {}  # our path -> {period (None: not stacked): delta}
    for rule, chosen in by_rule.values():
        ours = [jax.ShapeDtypeStruct(flat[p].shape[1:] if rule.period is not None else flat[p].shape, jnp.float32)
                for p in rule.ours]
        zeros = jax.eval_shape(rule.to_hf, *ours)
        hf = [hf_delta(*_pair(adapters, chosen[i].key), spec.scale) if i in chosen else jnp.zeros(z.shape)
              for i, z in enumerate(zeros)]  # an untargeted part of a fused parameter (up_proj of gate_up): zero
        for p, d in zip(rule.ours, rule.to_ours(*hf)):
            deltas.setdefault(tuple(p), {})[rule.period] = d
    out = {}
    for path, value in flat.items():
        parts = deltas.get(path)
        if parts is None:
            out[path] = value.astype(dtype_of(path, value))
            continue
        if None in parts:
            delta = parts[None]
        else:
            zero = jnp.zeros_like(next(iter(parts.values())))
            delta = jnp.stack([parts.get(i, zero) for i in range(value.shape[0])])
        out[path] = (value.astype(jnp.float32) + delta).astype(dtype_of(path, value))
    return jax.tree_util.tree_map_with_path(
        lambda p, _: out[tuple(getattr(k, "key", getattr(k, "idx", k)) for k in p)], base)


DECODER = ("decoder", "periods")  # where the layer scan's parameters live; paths below it are the period's own


class PeriodMerge:
    """The LoRA merge done per decoder period inside the layer scan (`nn.decoder.Decoder.__call__`'s
    period_transform): `extra = pm.extra(adapters)` stacks the adapters of every targeted HF weight per period
    slot ([num_periods, ...]; a period where that slot is not targeted holds zeros, adding exactly 0), and
    `pm.merge(period_params, extra_slice, dtype_of)` computes W + (alpha/r) * A @ B for one period's slice of the
    stacked base, the same expressions as `merged_params` on that slice. With one period (no scan) the adapters
    are not stacked."""

    def __init__(self, spec: LoraSpec, num_periods: int):
        self.spec, self.num_periods = spec, num_periods
        self.groups = {}  # the period's paths of a rule -> (a rule with them, {(period, index): Target})
        for t in spec.targets:
            key = tuple(tuple(p[len(DECODER):]) for p in t.rule.ours)
            self.groups.setdefault(key, (t.rule, {}))[1][(t.rule.period, t.index)] = t

    def extra(self, adapters) -> tuple:
        """Per group, per targeted HF index (sorted): (A, B), stacked on a leading [num_periods] axis."""
        out = []
        for _, chosen in self.groups.values():
            pairs = []
            for index in sorted({i for _, i in chosen}):
                per = {p: _pair(adapters, t.key) for (p, i), t in chosen.items() if i == index}
                if None in per:
                    pairs.append(per[None])
                    continue
                a0, b0 = next(iter(per.values()))
                pairs.append(tuple(jnp.stack([per[p][k] if p in per else jnp.zeros_like(z)
                                              for p in range(self.num_periods)]) for k, z in enumerate((a0, b0))))
            out.append(tuple(pairs))
        return tuple(out)

    def merge(self, params, extra, dtype_of=None):
        """One period's parameters (plain arrays, paths relative to the period) + its slice of `extra` -> the
        effective parameters; `dtype_of(path, array)` as in `merged_params` (path relative to the period)."""
        flat = _flat(params)
        dtype_of = dtype_of or (lambda path, x: x.dtype)
        deltas = {}
        for (paths, (rule, chosen)), pairs in zip(self.groups.items(), extra):
            indices = sorted({i for _, i in chosen})
            zeros = jax.eval_shape(rule.to_hf, *(jax.ShapeDtypeStruct(flat[p].shape, jnp.float32) for p in paths))
            hf = [hf_delta(*pairs[indices.index(i)], self.spec.scale) if i in indices else jnp.zeros(z.shape)
                  for i, z in enumerate(zeros)]
            deltas.update(zip(paths, rule.to_ours(*hf)))
        out = {path: (value.astype(jnp.float32) + deltas[path]).astype(dtype_of(path, value)) if path in deltas
               else value.astype(dtype_of(path, value)) for path, value in flat.items()}
        return jax.tree_util.tree_map_with_path(
            lambda p, _: out[tuple(getattr(k, "key", getattr(k, "idx", k)) for k in p)], params)


def merge_lora(model: Qwen35, spec: LoraSpec, adapters) -> Qwen35:
    """A new model whose targeted weights are W + (alpha/r) * A @ B (in the model's dtype); `model` is unchanged.
    adapters: the adapters' State (LoRAParam Variables or plain arrays)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, merged_params(spec, plain_values(state), plain_values(adapters)))


# ----- the PEFT layout ----------------------------------------------------------------------------------------
def _peft_module(t: Target, spec: LoraSpec) -> str:
    """PEFT's module name of a target. Both expert tensors of one layer adapted: PEFT nests two ParamWrappers
    (parameters matched in registration order: gate_up_proj inside, as `experts.base_layer`, down_proj outside)."""
    module = t.name.removesuffix(".weight").rpartition(".")[0] if t.experts else t.name.removesuffix(".weight")
    if t.experts and t.key[-1] == "gate_up_proj":
        down = t.name.replace("gate_up_proj", "down_proj")
        if any(o.name == down for o in spec.targets):
            module += ".base_layer"
    return PEFT_PREFIX + module


def peft_tensors(spec: LoraSpec, adapters) -> dict[str, np.ndarray]:
    """{PEFT tensor name: float32 array}: lora_A.weight [r, in], lora_B.weight [out, r]; routed experts as PEFT's
    ParamWrapper keeps them: lora_A.weight [E*r, in] (expert-major rows), lora_B.weight [out, r*E] (rank-major
    columns), so that delta[e] = scale * B[:, k*E + e] summed with A[e*r + k] over k."""
    values = plain_values(adapters)
    out = {}
    for t in spec.targets:
        a, b = (np.asarray(jax.device_get(x), np.float32) for x in _pair(values, t.key))
        if t.experts:
            e, n_in, r = a.shape
            a, b = a.transpose(0, 2, 1).reshape(e * r, n_in), b.transpose(2, 1, 0).reshape(b.shape[-1], r * e)
        else:
            a, b = a.T, b.T
        module = _peft_module(t, spec)
        out[f"{module}.lora_A.weight"], out[f"{module}.lora_B.weight"] = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return out


def peft_config(spec: LoraSpec, base_model: str | None = None) -> dict:
    """adapter_config.json: the exact module and parameter names adapted (no pattern left to PEFT's matching)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank, "lora_alpha": spec.alpha,
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "inference_mode": True, "base_model_name_or_path": base_model,
            "target_modules": sorted(t.name.removesuffix(".weight") for t in spec.targets if not t.experts),
            "target_parameters": [t.name for t in spec.targets if t.experts]}


def export_peft(spec: LoraSpec, adapters, out: str | Path, base_model: str | None = None) -> Path:
    """Writes `out/adapter_config.json` + `out/adapter_model.safetensors` (PEFT's layout: `PeftModel.from_pretrained`
    on the HF base model loads it; every target, routed experts included, is exported)."""
    from safetensors.numpy import save_file
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(peft_tensors(spec, adapters), str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(peft_config(spec, base_model), indent=2))
    return out


def load_peft(cfg, folder: str | Path) -> tuple[LoraSpec, dict]:
    """(spec, adapter arrays) from a folder `export_peft` wrote (exact names in its config)."""
    from safetensors.numpy import load_file
    folder = Path(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    names = [re.escape(m) + r"\.weight$" for m in config["target_modules"]]
    names += [re.escape(p) + "$" for p in config.get("target_parameters") or []]
    spec = LoraSpec.from_config(cfg, {"rank": config["r"], "alpha": config["lora_alpha"], "targets": names})
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    values = plain_values(adapter_variables(spec, abstract=True))
    for t in spec.targets:
        module = _peft_module(t, spec)
        a, b = tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"]
        if t.experts:
            e, r = t.shape[0], spec.rank
            a, b = a.reshape(e, r, -1).transpose(0, 2, 1), b.reshape(-1, r, e).transpose(2, 1, 0)
        else:
            a, b = a.T, b.T
        node = values
        for k in t.key:
            node = node[k]
        node["lora_a"], node["lora_b"] = jnp.asarray(a), jnp.asarray(b)
    return spec, values


def main(argv=None) -> int:
    """`python -m train.lora merge --base CKPT --adapter PEFT_DIR --out OUT [--dtype float32|bfloat16]`."""
    import argparse

    from qwen35_jax.checkpoint.orbax_io import ASSETS, is_orbax_checkpoint, save_model
    from qwen35_jax.loading import load_model
    parser = argparse.ArgumentParser(prog="python -m train.lora", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="base checkpoint + PEFT adapter folder -> merged model checkpoint")
    merge.add_argument("--base", required=True, help="Orbax model checkpoint or HF folder")
    merge.add_argument("--adapter", required=True, help="a folder export_peft wrote (a LoRA run's output_dir/adapter)")
    merge.add_argument("--out", required=True)
    merge.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args(argv)
    model = load_model(args.base)
    spec, adapters = load_peft(model.config, args.adapter)
    assets = Path(args.base) / ASSETS if is_orbax_checkpoint(args.base) else Path(args.base)
    print(save_model(merge_lora(model, spec, adapters), args.out, dtype=args.dtype, assets_from=assets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
