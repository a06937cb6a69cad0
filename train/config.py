"""Fine-tuning run configuration: a YAML file of known keys, plus `key=value` overrides from the command line."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
from pathlib import Path

import yaml


RECIPE_DIR = importlib.resources.files("train") / "recipes"  # package data: NAME.yaml per bundled recipe


class TrainConfigError(ValueError):
    """A bad training config; `key` names the config key at fault, when there is one."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def _parse_override(item: str) -> tuple[str, object]:
    """`key=value` from the command line -> (key, value parsed as YAML)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise TrainConfigError(f"command-line override {item!r}: expected key=value")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise TrainConfigError(f"command-line override {item!r}: the value is not valid YAML ({e})") from None


def recipe_names() -> tuple[str, ...]:
    """The bundled recipes, by name (`train/recipes/NAME.yaml`, installed as package data)."""
    return tuple(sorted(p.name.removesuffix(".yaml") for p in RECIPE_DIR.iterdir() if p.name.endswith(".yaml")))


def recipe_path(source: str | Path):
    """A YAML path as given, or the bundled recipe of that name (`demo`, `sft-example`) when no such file exists."""
    if not Path(source).exists() and str(source) in recipe_names():
        return RECIPE_DIR / f"{source}.yaml"
    return Path(source)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # what to train
    model: str = "tiny-moe"                  # preset name (random init), HF folder or Orbax checkpoint
    model_overrides: dict = dataclasses.field(default_factory=dict)  # config fields (random init only)
    tokenizer: str | None = None             # folder; default: the model folder (or its Orbax assets)
    train_data: list = dataclasses.field(default_factory=list)  # JSON-lines files
    eval_data: list = dataclasses.field(default_factory=list)
    seq_len: int = 512                       # packed row length
    overflow: str = "split"                  # documents longer than seq_len: "split" or "reject"
    add_eos: bool = True                     # append EOS to plain-text documents
    # optimisation
    steps: int = 100
    batch_size: int = 8                      # rows per optimizer step (global, all micro-batches)
    grad_accum: int = 1                      # micro-batches per step (batch_size % grad_accum == 0)
    learning_rate: float = 1e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1                # cosine decay ends at learning_rate * min_lr_ratio
    weight_decay: float = 0.1                # matrices only (no decay on norms and 1-D params)
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0               # global-norm clipping (0: off)
    router_aux_loss_coef: float | None = None  # None: the model config's router_aux_loss_coef
    router_z_loss_coef: float = 0.0
    mtp_loss_weight: float = 0.0             # > 0: + this x the MTP block's cross-entropy on token t+2 (model with
                                             # an MTP block); 0: the MTP block, if any, stays frozen
    mtp_draft_steps: int = 1                 # > 1: also train the MTP fed its own output, as drafts 2.. are made
                                             # (train.loss.mtp_chain_masks); the loss averages every step's targets
    frozen: list = dataclasses.field(default_factory=list)  # regexes over HF names: model.layers.3.mlp.gate.weight
    lora: dict | None = None                 # {rank, alpha, targets: [regexes over the same names]}: train.lora
    # numerics and memory
    param_dtype: str = "float32"             # master weights
    compute_dtype: str = "float32"           # matrices cast to this for the forward/backward
    remat: str = "none"                      # none | full | dots
    scan_layers: bool = True
    moe_backend: str = "auto"                # grouped matmul + token exchange: auto | ragged (TPU) | blocked (CPU, GPU)
    loss_chunk: int = 4096                   # tokens per cross-entropy block (0: all at once)
    mesh: str | None = None                  # e.g. "fsdp=2,expert=2,tensor=2" (None: one device)
    seed: int = 0
    # run bookkeeping
    output_dir: str = "runs/default"
    save_every: int = 100
    keep_checkpoints: int = 3
    eval_every: int = 50
    eval_batches: int = 4
    log_every: int = 1
    export_hf: str | None = None             # folder for an HF export of the final weights (replaced if present)

    def __post_init__(self):
        _check(self)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
        """Reads a YAML file or bundled recipe name (None: defaults) and applies `key=value` overrides (values
        parsed as YAML)."""
        raw, origin = {}, {}
        if path is not None:
            path = recipe_path(path)
            try:
                raw = yaml.safe_load(path.read_text()) or {}
            except (OSError, yaml.YAMLError) as e:
                raise TrainConfigError(f"{path}: cannot read the training config (a YAML path or a bundled "
                                       f"recipe name: {', '.join(recipe_names())}): {e}") from None
            if not isinstance(raw, dict):
                raise TrainConfigError(f"{path}: expected a mapping of config keys, got {type(raw).__name__}")
            origin = dict.fromkeys(raw, str(path))
        for item in overrides:
            key, value = _parse_override(item)
            raw[key], origin[key] = value, f"command-line override {item!r}"
        return cls.from_dict(raw, where=str(path) if path else "command line", origin=origin)

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config", origin: dict | None = None) -> TrainConfig:
        """`origin` maps keys to where their values came from (a file, a command-line override), for errors
        about one key; other errors name `where`."""
        origin = origin or {}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            sources = "; ".join(sorted({origin.get(k, where) for k in unknown}))
            hints = [m[0] for k in unknown if (m := difflib.get_close_matches(k, fields, 1))]
            hint = f" (did you mean {' or '.join(map(repr, hints))}?)" if hints else ""
            raise TrainConfigError(f"{sources}: unknown config key(s) {unknown}{hint}; known keys: {sorted(fields)}")
        values = {}
        for key, value in raw.items():
            if key in ("train_data", "eval_data", "frozen") and isinstance(value, str):
                value = [value]
            if key in fields and "float" in str(fields[key].type) and isinstance(value, str):
                try:  # YAML 1.1 reads "3e-4" as a string
                    value = float(value)
                except ValueError:
                    pass
            values[key] = value
        try:
            return cls(**values)
        except TrainConfigError as e:
            if e.key is None:
                raise
            raise TrainConfigError(f"{origin.get(e.key, where)}: {e}", key=e.key) from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def help_text(cls) -> str:
        """The config keys and their defaults, for a CLI's --help."""
        defaults = dataclasses.asdict(cls())
        return "config keys (default):\n" + "\n".join(f"  {k} = {v!r}" for k, v in defaults.items())


_TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str, "list": list, "dict": dict}


def _check(c: TrainConfig) -> None:
    for f in dataclasses.fields(c):
        value = getattr(c, f.name)
        kinds = [k.strip() for k in str(f.type).split("|")]
        allowed = tuple(t for k in kinds if k in _TYPES for t in
                        (_TYPES[k] if isinstance(_TYPES[k], tuple) else (_TYPES[k],)))
        ok = (value is None and "None" in kinds) or (isinstance(value, allowed) and
                                                     not (isinstance(value, bool) and bool not in allowed))
        if not ok:
            raise TrainConfigError(f"config key {f.name!r}: expected {f.type}, got {value!r}", key=f.name)
    for key in ("train_data", "eval_data", "frozen"):
        if not all(isinstance(item, str) for item in getattr(c, key)):
            raise TrainConfigError(f"config key {key!r}: expected a list of strings, got {getattr(c, key)!r}",
                                   key=key)
    choices = {"overflow": ("split", "reject"), "remat": ("none", "full", "dots"),
               "param_dtype": ("float32", "bfloat16"), "compute_dtype": ("float32", "bfloat16"),
               "moe_backend": ("auto", "ragged", "blocked")}
    for key, allowed in choices.items():
        if getattr(c, key) not in allowed:
            raise TrainConfigError(f"config key {key!r}: {getattr(c, key)!r} is not one of {list(allowed)}",
                                   key=key)
    positive = ("steps", "batch_size", "grad_accum", "seq_len", "save_every", "keep_checkpoints", "eval_every",
                "eval_batches", "log_every", "mtp_draft_steps")
    for key in positive:
        if getattr(c, key) <= 0:
            raise TrainConfigError(f"config key {key!r}: expected a positive integer, got {getattr(c, key)}",
                                   key=key)
    if c.mtp_loss_weight < 0:
        raise TrainConfigError(f"config key 'mtp_loss_weight': expected a number >= 0, got {c.mtp_loss_weight}",
                               key="mtp_loss_weight")
    if c.lora is not None:
        _check_lora(c)
    if c.batch_size % c.grad_accum:
        raise TrainConfigError(f"batch_size={c.batch_size} is not a multiple of grad_accum={c.grad_accum}")
    if c.seq_len < 2:
        raise TrainConfigError(f"seq_len={c.seq_len}: need at least 2 tokens per row", key="seq_len")


LORA_KEYS = ("rank", "alpha", "targets")


def _check_lora(c: TrainConfig) -> None:
    """lora: {rank: positive int, alpha: positive number, targets: non-empty list of regexes}; not with frozen
    (with LoRA the whole base model is frozen)."""
    lora = c.lora

    def fail(message):
        raise TrainConfigError(f"config key 'lora': {message} (expected {{rank: 16, alpha: 32, targets: "
                               "[regex, ...]}})", key="lora")
    unknown, missing = sorted(set(lora) - set(LORA_KEYS)), [k for k in LORA_KEYS if k not in lora]
    if unknown or missing:
        fail(f"unknown key(s) {unknown}" if unknown else f"missing {missing}")
    if isinstance(lora["rank"], bool) or not isinstance(lora["rank"], int) or lora["rank"] <= 0:
        fail(f"rank={lora['rank']!r} is not a positive integer")
    if isinstance(lora["alpha"], bool) or not isinstance(lora["alpha"], (int, float)) or lora["alpha"] <= 0:
        fail(f"alpha={lora['alpha']!r} is not a positive number")
    targets = lora["targets"]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        fail(f"targets={targets!r} is not a non-empty list of regular expressions")
    if c.mtp_loss_weight > 0:
        raise TrainConfigError("config keys 'mtp_loss_weight' and 'lora': training the MTP block with LoRA is not "
                               "supported; use full fine-tuning (frozen: ['^(?!mtp\\.)'] trains the MTP block alone)",
                               key="mtp_loss_weight")
    if c.frozen:
        raise TrainConfigError("config keys 'frozen' and 'lora': with lora the whole base model is frozen; drop "
                               "frozen", key="frozen")
