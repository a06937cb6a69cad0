"""Per-device FLOPs and collective bytes of a compiled step, and step-time / MFU estimates.

XLA's `compiled.cost_analysis()` counts a while loop's body once, so a layer scan, the Gated DeltaNet chunk
scan or a fori_loop is under-counted by its trip count. `hlo_cost` reads the post-optimisation HLO text
(`jax.jit(f).lower(...).compile().as_text()`: SPMD-partitioned, so shapes are per device) and multiplies
every loop body by its trip count:

    cost = hlo_cost(compiled.as_text())
    estimate_step(cost, CHIPS["v5p"])     # {"compute_s", "collective_s", "step_s"}
    mfu(model_flops(cfg, batch, seq), devices=256, step_seconds=measured, chip=CHIPS["v5p"])

`model_flops` is the analytic count for a Qwen3.5 config (the "model FLOPs" of MFU, without remat).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all",
               "collective-permute")
# Bits per element; f8 / s4 variants are matched by prefix in `_bits`.
DTYPE_BITS = {"pred": 8, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "f16": 16, "bf16": 16, "s32": 32,
              "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64, "c64": 64, "c128": 128,
              "s4": 4, "u4": 4, "s2": 2, "u2": 2, "token": 0}

_HEADER = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s*(\(.*)?\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"\b([a-z]\w*)\[([^\]]*)\]")
_OPCODE = re.compile(r"\s*([\w\-]+)\(")
_NAME = re.compile(r"%([^\s,()]+)")


# ---- the cost record ----------------------------------------------------------------------------
@dataclasses.dataclass
class HloCost:
    """Per-device totals. flops: dot and convolution FLOPs only (elementwise ops, reductions, transcendental
    functions and custom kernels other than cuBLAS / cuDNN calls are not counted). collective_bytes /
    collective_counts: per collective kind (see `_collective_bytes`). unknown_trip_counts: while loops
    whose trip count could not be found, counted once (a caller should warn)."""

    flops: int = 0
    collective_bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    collective_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    unknown_trip_counts: list[str] = dataclasses.field(default_factory=list)

    @property
    def total_collective_bytes(self) -> int:
        return sum(self.collective_bytes.values())

    def __add__(self, other: HloCost) -> HloCost:
        return HloCost(self.flops + other.flops, _merge(self.collective_bytes, other.collective_bytes, _add),
                       _merge(self.collective_counts, other.collective_counts, _add),
                       self.unknown_trip_counts + other.unknown_trip_counts)

    def times(self, n: int) -> HloCost:
        return HloCost(self.flops * n, {k: v * n for k, v in self.collective_bytes.items()},
                       {k: v * n for k, v in self.collective_counts.items()}, list(self.unknown_trip_counts))

    def maximum(self, other: HloCost) -> HloCost:
        """Field-wise maximum (the cost of a conditional: the most expensive branch, per field)."""
        return HloCost(max(self.flops, other.flops), _merge(self.collective_bytes, other.collective_bytes, max),
                       _merge(self.collective_counts, other.collective_counts, max),
                       self.unknown_trip_counts + other.unknown_trip_counts)


def _add(a, b):
    return a + b


def _merge(a: dict, b: dict, op) -> dict:
    return {k: op(a.get(k, 0), b.get(k, 0)) for k in {**a, **b}}


# ---- parsing --------------------------------------------------------------------------------------
@dataclasses.dataclass
class Instruction:
    """One HLO instruction: `name = type opcode(operands), attributes` (metadata dropped)."""

    name: str
    type: str  # "f32[4,128]{1,0}" or a tuple "(f32[2], s32[])"
    opcode: str
    operands: list[str]  # operand names, or the literal of a `constant`
    attributes: str
    root: bool = False


def _bits(dtype: str) -> int:
    """Element size in bits: DTYPE_BITS, 8 for any f8 variant (f8e4m3fn, ...), 0 for unknown kinds."""
    if dtype in DTYPE_BITS:
        return DTYPE_BITS[dtype]
    return 8 if dtype.startswith("f8") else 4 if dtype.startswith("f4") else 0


def shape_dims(type_text: str) -> list[tuple[str, list[int]]]:
    """"bf16[4,128]{1,0}" -> [("bf16", [4, 128])]; a tuple "(f32[2], s32[])" -> one entry per array.
    Dynamic dims ("<=8") count at their bound."""
    return [(dtype, [int(d.lstrip("<=?")) for d in dims.split(",") if d.strip().lstrip("<=?")])
            for dtype, dims in _ARRAY.findall(type_text)]


def shape_bytes(type_text: str) -> int:
    """Bytes of an array type, or the sum over a tuple's arrays."""
    return sum(math.prod(dims) * _bits(dtype) // 8 for dtype, dims in shape_dims(type_text))


def _closing(text: str, start: int, open_: str = "(", close: str = ")") -> int:
    """Index of the bracket closing text[start] (== open_), counting nesting."""
    depth = 0
    for i in range(start, len(text)):
        depth += (text[i] == open_) - (text[i] == close)
        if depth == 0:
            return i
    raise ValueError(f"unbalanced {open_!r} in {text[:200]!r}")


def _without_metadata(attributes: str) -> str:
    """Drops `metadata={...}` (op names and source paths, which could read as attributes)."""
    start = attributes.find("metadata={")
    end = attributes.find("}", start)
    return attributes if start < 0 or end < 0 else attributes[:start] + attributes[end + 1:]


def parse_instruction(line: str) -> Instruction | None:
    """Parses `[ROOT] %name = TYPE opcode(OPERANDS), ATTRS`; None for anything else."""
    match = _INSTRUCTION.match(line)
    if match is None:
        return None
    root, name, rest = match.groups()
    if rest.startswith("("):  # tuple type
        end = _closing(rest, 0) + 1
    else:
        end = rest.find(" ")
        if end < 0:
            return None
    type_text, rest = rest[:end], rest[end:]
    op = _OPCODE.match(rest)
    if op is None:
        return None
    close = _closing(rest, op.end() - 1)
    operand_text, attributes = rest[op.end():close], _without_metadata(rest[close + 1:])
    if op.group(1) == "constant":
        operands = [operand_text.strip()]
    elif "%" in operand_text:
        operands = _NAME.findall(operand_text)
    else:  # names without '%': the last token of each comma-separated operand
        operands = [part.split()[-1] for part in operand_text.split(",") if part.strip()]
    return Instruction(name, type_text, op.group(1), operands, attributes, bool(root))


def parse_module(hlo_text: str) -> tuple[dict[str, dict[str, Instruction]], str]:
    """HLO module text -> ({computation: {instruction name: Instruction}} in text order, entry name)."""
    computations, entry, current = {}, None, None
    for line in hlo_text.splitlines():
        if current is None:
            header = _HEADER.match(line)
            if header and not line.startswith("HloModule"):
                current = computations.setdefault(header.group(2), {})
                entry = header.group(2) if header.group(1) else entry
        elif line.strip() == "}":
            current = None
        else:
            instruction = parse_instruction(line)
            if instruction is not None:
                current[instruction.name] = instruction
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return computations, entry


def _attribute(attributes: str, key: str) -> str | None:
    """The value of `key=value` (a name, or a {...} list without the braces), None if absent."""
    match = re.search(rf"\b{key}=(\{{[^}}]*\}}|[^\s,]+)", attributes)
    return match.group(1).strip("{}") if match else None


def _called(attributes: str, key: str) -> list[str]:
    """Computation names in `key=%a` or `key={%a, %b}`."""
    value = _attribute(attributes, key)
    return [n.strip().lstrip("%") for n in value.split(",") if n.strip()] if value else []


def _int_list(value: str | None) -> list[int]:
    return [int(v) for v in value.split(",") if v.strip()] if value else []


# ---- FLOPs of one instruction ----------------------------------------------------------------------
def _operand_dims(comp: dict[str, Instruction], name: str) -> list[int]:
    shapes = shape_dims(comp[name].type) if name in comp else []
    return shapes[0][1] if shapes else []


def _dot_flops(inst: Instruction, comp: dict[str, Instruction], contracting: list[int]) -> int:
    """2 * prod(result dims) * prod(lhs contracting dims); a tuple result (cuBLAS: output, workspace)
    counts its first array."""
    lhs, result = _operand_dims(comp, inst.operands[0]), shape_dims(inst.type)
    return 2 * math.prod(result[0][1] if result else []) * math.prod(lhs[d] for d in contracting if d < len(lhs))


def _ragged_dot_flops(inst: Instruction, comp: dict[str, Instruction]) -> int:
    """`ragged-dot(lhs, rhs, group_sizes)` as a dot; when the ragged dim is contracted the result gains a
    group dim while each group contracts only its own rows, so divide by the number of groups."""
    contracting = _int_list(_attribute(inst.attributes, "lhs_contracting_dims"))
    flops = _dot_flops(inst, comp, contracting)
    if set(_int_list(_attribute(inst.attributes, "lhs_ragged_dims"))) & set(contracting):
        flops //= max(1, (_operand_dims(comp, inst.operands[2]) or [1])[-1])
    return flops


def _conv_flops(inst: Instruction, comp: dict[str, Instruction]) -> int:
    """2 * prod(result dims) * prod(kernel dims) / kernel output features: every output element takes a
    multiply-add over the kernel window and the input features of its group (padding taps included)."""
    labels = _attribute(inst.attributes, "dim_labels") or ""  # e.g. b01f_01io->b01f
    kernel, result = _operand_dims(comp, inst.operands[1]), shape_dims(inst.type)
    kernel_labels = labels.partition("_")[2].partition("->")[0]
    if "o" not in kernel_labels or len(kernel) != len(kernel_labels) or not result:
        return 0
    flops = 2 * math.prod(result[0][1]) * math.prod(kernel) // kernel[kernel_labels.index("o")]
    return flops * _dilated_taps(inst) // max(1, _window_taps(inst))


def _window(inst: Instruction, key: str) -> list[int]:
    """A `window={size=2x4x4 ... lhs_dilate=2x4x4}` field as a list of ints ([] when absent)."""
    import re
    match = re.search(rf"\b{key}=([0-9x]+)", inst.attributes)
    return [int(v) for v in match.group(1).split("x")] if match else []


def _window_taps(inst: Instruction) -> int:
    return math.prod(_window(inst, "size")) or 1


def _dilated_taps(inst: Instruction) -> int:
    """Window taps that can meet a real input: with `lhs_dilate=d` (TPU writes batched matmuls as such
    base-dilated convolutions) only ceil(size / d) of each dim's taps land on a non-inserted element."""
    sizes, dilation = _window(inst, "size"), _window(inst, "lhs_dilate")
    if not sizes:
        return 1
    dilation = dilation or [1] * len(sizes)
    return math.prod(-(-s // d) for s, d in zip(sizes, dilation))


def _custom_call_flops(inst: Instruction, comp: dict[str, Instruction]) -> int:
    """cuBLAS gemms (backend_config `gemm_backend_config.dot_dimension_numbers`) and cuDNN convolutions
    (`dim_labels`); other custom calls (Pallas / Mosaic kernels, ...) count 0."""
    if "dim_labels=" in inst.attributes and "window=" in inst.attributes:
        return _conv_flops(inst, comp)
    config = _backend_config(inst) or {}
    numbers = config.get("gemm_backend_config", config).get("dot_dimension_numbers")
    if numbers is None:
        return 0
    return _dot_flops(inst, comp, [int(d) for d in numbers.get("lhs_contracting_dimensions", [])])


def _backend_config(inst: Instruction) -> dict | None:
    """The JSON `backend_config={...}`, or None."""
    start = inst.attributes.find("backend_config={")
    if start < 0:
        return None
    start += len("backend_config=")
    try:
        return json.loads(inst.attributes[start:_closing(inst.attributes, start, "{", "}") + 1])
    except ValueError:
        return None


# ---- collectives --------------------------------------------------------------------------------
def _collective_kind(opcode: str) -> str | None:
    """"all-gather-done" -> "all-gather"; "all-reduce" -> "all-reduce"; None for `-start` halves (their
    `-done` is counted) and for everything else."""
    base = opcode.removesuffix("-done")
    return base if base in COLLECTIVES else None


def _collective_bytes(kind: str, operands_bytes: int, result_bytes: int) -> int:
    """all-gather: result bytes (the gathered array); reduce-scatter, all-reduce, all-to-all,
    collective-permute: operand bytes (the last three equal their result bytes); ragged-all-to-all: its
    result, the output-buffer operand, an upper bound on what is sent."""
    return operands_bytes if kind == "reduce-scatter" else result_bytes


def _collective_cost(inst: Instruction, comp: dict[str, Instruction], kind: str) -> HloCost:
    """An async `-done` takes its operands from the matching `-start`."""
    source = comp.get(inst.operands[0]) if inst.opcode.endswith("-done") else inst
    operand_names = source.operands if source is not None else []
    if kind == "ragged-all-to-all":
        operand_names = operand_names[1:2]  # (input, output, offsets and sizes...)
    operands_bytes = sum(shape_bytes(comp[n].type) for n in operand_names if n in comp)
    size = _collective_bytes(kind, operands_bytes, shape_bytes(inst.type))
    return HloCost(collective_bytes={kind: size}, collective_counts={kind: 1})


# ---- while-loop trip counts -----------------------------------------------------------------------
def _trip_count(inst: Instruction, computations: dict) -> int | None:
    """backend_config `known_trip_count`, else `_inferred_trip_count`, else None."""
    config = _backend_config(inst) or {}
    if "known_trip_count" in config:
        return int(config["known_trip_count"]["n"])
    init_step = config.get("known_init_step", {})
    condition = _called(inst.attributes, "condition")
    return _inferred_trip_count(computations, condition[0], int(init_step.get("init", 0)),
                                int(init_step.get("step", 1))) if condition else None


def _root(comp: dict[str, Instruction]) -> Instruction | None:
    return next((i for i in comp.values() if i.root), None)


def _inferred_trip_count(computations: dict, condition: str, init: int, step: int) -> int | None:
    """The condition's root compares the induction variable with a constant N (directly or as the root of
    a fusion it calls): `i < N` gives ceil((N - init) / step) iterations, `i <= N` one more; `N > i`,
    `N >= i` likewise. init and step default to 0 and 1 (XLA's `known_init_step` when given)."""
    comp = computations.get(condition, {})
    compare, operands = _root(comp), []
    if compare is not None and compare.opcode == "fusion":
        fused = computations.get((_called(compare.attributes, "calls") or [""])[0], {})
        outer, compare = compare, _root(fused)
        if compare is not None:
            operands = [_outside(fused.get(n), outer, comp) for n in compare.operands]
    elif compare is not None:
        operands = [comp.get(n) for n in compare.operands]
    if compare is None or compare.opcode != "compare" or len(operands) != 2:
        return None
    direction = _attribute(compare.attributes, "direction")
    lhs, rhs = (_constant_int(i) for i in operands)
    if rhs is not None and direction in ("LT", "LE"):
        bound = rhs + (direction == "LE")
    elif lhs is not None and direction in ("GT", "GE"):
        bound = lhs + (direction == "GE")
    else:
        return None
    return max(0, -(-(bound - init) // step)) if step > 0 else None


def _outside(inst: Instruction | None, fusion: Instruction, comp: dict[str, Instruction]):
    """A fused computation's `parameter(k)` -> the fusion's k-th operand in `comp`; other instructions
    as they are."""
    if inst is None or inst.opcode != "parameter":
        return inst
    k = int(inst.operands[0])
    return comp.get(fusion.operands[k]) if k < len(fusion.operands) else None


def _constant_int(inst: Instruction | None) -> int | None:
    """The value of a scalar integer `constant(N)`, else None."""
    if inst is None or inst.opcode != "constant":
        return None
    try:
        return int(inst.operands[0])
    except ValueError:
        return None


# ---- the walk ---------------------------------------------------------------------------------------
def hlo_cost(hlo_text: str) -> HloCost:
    """Per-device FLOPs and collective bytes of a compiled, SPMD-partitioned HLO module (its `as_text()`).

    Walks from the entry computation: `while` bodies count times their trip count (backend_config
    `known_trip_count`, else inferred from the condition, else 1 and listed in `unknown_trip_counts`; nested
    loops multiply; the condition's own cost, a compare, is not counted); `conditional` counts its most
    expensive branch (field-wise maximum); `fusion` / `call` / `async-start` / `custom-call` recurse into
    the computations they call. Reducer computations (`to_apply=` of reduce, all-reduce, sort, scatter, ...)
    hold only scalar ops and are not visited.
    FLOPs: `dot` 2 * prod(result) * prod(contracting dims); `ragged-dot` likewise (`_ragged_dot_flops`);
    `convolution`, cuBLAS and cuDNN custom-calls (`_conv_flops`, `_custom_call_flops`); elementwise ops
    are ignored. Collectives: see `_collective_bytes`; an async `-start` / `-done` pair counts once.
    """
    computations, entry = parse_module(hlo_text)
    memo: dict[str, HloCost] = {}

    def computation_cost(name: str) -> HloCost:
        if name not in memo:
            comp = computations.get(name, {})
            total = HloCost()
            for inst in comp.values():
                total = total + instruction_cost(inst, comp)
            memo[name] = total
        return memo[name]

    def instruction_cost(inst: Instruction, comp: dict[str, Instruction]) -> HloCost:
        op, attrs = inst.opcode, inst.attributes
        if op == "dot":
            return HloCost(flops=_dot_flops(inst, comp, _int_list(_attribute(attrs, "lhs_contracting_dims"))))
        if op == "ragged-dot":
            return HloCost(flops=_ragged_dot_flops(inst, comp))
        if op == "convolution":
            return HloCost(flops=_conv_flops(inst, comp))
        if _collective_kind(op):
            return _collective_cost(inst, comp, _collective_kind(op))
        if op == "while":
            body = computation_cost(_called(attrs, "body")[0])
            trips = _trip_count(inst, computations)
            if trips is None:
                return body + HloCost(unknown_trip_counts=[inst.name])
            return body.times(trips)
        if op == "conditional":
            branches = _called(attrs, "branch_computations") or (
                _called(attrs, "true_computation") + _called(attrs, "false_computation"))
            result = HloCost()
            for branch in branches:
                result = result.maximum(computation_cost(branch))
            return result
        called = {"fusion": "calls", "call": "to_apply", "async-start": "calls",
                  "custom-call": "called_computations"}.get(op)
        total = HloCost(flops=_custom_call_flops(inst, comp)) if op == "custom-call" else HloCost()
        for sub in _called(attrs, called) if called else []:
            total = total + computation_cost(sub)
        return total

    return computation_cost(entry)


# ---- chips and the step-time model ----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip. peak_bf16_flops: dense bf16 FLOP/s; hbm_bytes; hbm_bandwidth: bytes/s;
    interconnect_bandwidth: bytes/s per chip, one direction, all links together (ICI / NVLink);
    devices_per_chip: JAX devices per chip (1 for these: v5p's two TensorCores form one megacore device)."""

    peak_bf16_flops: float
    hbm_bytes: float
    hbm_bandwidth: float
    interconnect_bandwidth: float
    devices_per_chip: int = 1


GIB = 2**30
CHIPS = {
    # cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GiB HBM2e at 2765 GB/s; ICI 4800 Gbps
    # ("bidirectional ICI bandwidth per chip 1200 GBps" on the newer page): 600 GB/s one way.
    "v5p": Chip(459e12, 95 * GIB, 2765e9, 600e9),
    # cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s; ICI 1600 Gbps
    # ("bidirectional ICI bandwidth per chip 400 GBps" on the newer page): 200 GB/s one way.
    "v5e": Chip(197e12, 16e9, 819e9, 200e9),
    # cloud.google.com/tpu/docs/v6e (Trillium): 918 TFLOP/s bf16, 32 GB HBM at 1640 GB/s; ICI 3584 Gbps
    # (448 GB/s) on that page, "bidirectional 800 GBps" (400 GB/s one way) on the newer one: the lower kept.
    "v6e": Chip(918e12, 32e9, 1640e9, 400e9),
    # NVIDIA H100 SXM datasheet: bf16 tensor core 1979 TFLOP/s with 2:4 sparsity = 989 dense, 80 GB HBM3
    # at 3.35 TB/s, NVLink 900 GB/s bidirectional = 450 GB/s one way.
    "h100": Chip(989e12, 80e9, 3.35e12, 450e9),
    # NVIDIA H200 SXM datasheet: the H100's compute and NVLink, 141 GB HBM3e at 4.8 TB/s.
    "h200": Chip(989e12, 141e9, 4.8e12, 450e9),
}


def estimate_step(cost: HloCost, chip: Chip) -> dict[str, float]:
    """Seconds of one step on `chip` from a per-device `hlo_cost`: compute_s = flops / per-device peak;
    collective_s = all collective bytes / interconnect bandwidth (a deliberately simple model: no ring or
    topology factors, no latency, every byte crosses a link once); step_s = their sum, assuming no
    overlap of compute and communication: a pessimistic estimate (and memory-bound work is not modelled)."""
    compute = cost.flops / (chip.peak_bf16_flops / chip.devices_per_chip)
    collective = cost.total_collective_bytes / (chip.interconnect_bandwidth / chip.devices_per_chip)
    return {"compute_s": compute, "collective_s": collective, "step_s": compute + collective}


def mfu(model_flops_total: float, devices: int, step_seconds: float, chip: Chip) -> float:
    """Model FLOPs utilisation: model_flops_total (one step, all devices; `model_flops`) over what
    `devices` JAX devices of `chip` can do in step_seconds."""
    return model_flops_total / (step_seconds * devices * chip.peak_bf16_flops / chip.devices_per_chip)


# ---- analytic model FLOPs ---------------------------------------------------------------------------
DELTA_RULE_CHUNK = 64


def _layer_counts(cfg) -> tuple[int, int]:
    """(full-attention layers, Gated DeltaNet layers)."""
    n_attention = sum(t == "full_attention" for t in cfg.layer_types)
    return n_attention, len(cfg.layer_types) - n_attention


def active_params(cfg) -> int:
    """Weights one token multiplies with (matmuls only): attention q (with its output gate), k, v, o;
    Gated DeltaNet in_proj q/k/v/z/a/b and out_proj; the router, top-k routed experts and the shared
    expert (or the dense MLP); lm_head. Not counted: the embedding lookup, norms, the depthwise conv."""
    h = cfg.hidden_size  # q_proj is [h, heads, 2 * head_dim] (query and gate), o_proj [heads, head_dim, h]
    attention = h * cfg.num_attention_heads * cfg.head_dim * 3 + 2 * h * cfg.num_key_value_heads * cfg.head_dim
    key, value = cfg.linear_num_key_heads * cfg.linear_key_head_dim, \
        cfg.linear_num_value_heads * cfg.linear_value_head_dim
    deltanet = h * (2 * key + 2 * value + 2 * cfg.linear_num_value_heads) + value * h
    if cfg.is_moe:
        mlp = h * cfg.num_experts + 3 * h * cfg.moe_intermediate_size * cfg.num_experts_per_tok \
            + 3 * h * cfg.shared_expert_intermediate_size + h  # + the shared expert's [h, 1] gate
    else:
        mlp = 3 * h * cfg.intermediate_size
    n_attention, n_deltanet = _layer_counts(cfg)
    return n_attention * attention + n_deltanet * deltanet + len(cfg.layer_types) * mlp + h * cfg.vocab_size


def model_flops(cfg, batch: int, seq: int, training: bool = True) -> float:
    """Analytic FLOPs of one step on [batch, seq] tokens of a `ModelConfig`; training = 3x forward
    (forward + backward, no remat recompute), training=False: the forward.

    Per token: 2 * `active_params`; the depthwise conv, 2 * kernel * conv channels per DeltaNet layer;
    causal softmax attention, 2 * 2 * seq/2 * heads * head_dim per full-attention layer (scores and
    values over seq/2 keys on average); the chunked delta rule, approximated per DeltaNet layer as
    8 * heads * dk * dv (state reads / updates) + 2 * chunk * heads * (dk + dv) (within-chunk terms,
    chunk 64; heads = value heads). The MTP block is not counted.
    """
    n_attention, n_deltanet = _layer_counts(cfg)
    heads, dk, dv = cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    conv_channels = 2 * cfg.linear_num_key_heads * dk + heads * dv
    attention = 2 * 2 * (seq / 2) * cfg.num_attention_heads * cfg.head_dim
    deltanet = 8 * heads * dk * dv + 2 * DELTA_RULE_CHUNK * heads * (dk + dv) \
        + 2 * cfg.linear_conv_kernel_dim * conv_channels
    per_token = 2 * active_params(cfg) + n_attention * attention + n_deltanet * deltanet
    return (3 if training else 1) * batch * seq * per_token
