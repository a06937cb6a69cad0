"""Orbax checkpoints: streaming HF -> Orbax conversion, restore (optionally straight into shardings),
and export back to HF safetensors (written by `safetensors_io.ShardWriter`).

Layout (an Orbax v1 PyTree checkpoint): {"params": {our arrays, per HF layer: "layers"/"7"/..., the MTP block
under "mtp"}, "extra": {HF name: tensor} (vision tensors, and MTP tensors of a config without MTP, carried as
stored)}; the model config (HF form), the format tag and the source's MTP expert layout live in the
checkpoint's custom metadata. Per-layer keys make a checkpoint independent of the
scan period and of the mesh it was written on.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
from flax import nnx

from qwen35_jax.checkpoint.hf_loader import abstract_model, check_tensors, layer_shape, without_missing_mtp
from qwen35_jax.checkpoint.names import Rule, checkpoint_rules, detect_layout, has_mtp_tensors, is_skipped
from qwen35_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsFolder, ShardWriter
from qwen35_jax.config import ModelConfig
from qwen35_jax.sharding import variable_sharding

FORMAT = "qwen35-jax/1"
ASSETS = "assets"  # tokenizer, chat template and generation config, copied beside the arrays
ASSET_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
               "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "preprocessor_config.json",
               "video_preprocessor_config.json")


def copy_assets(src: Path, dst: Path) -> None:
    """Copies the non-weight files users need (tokenizer, templates, generation config) that exist."""
    for name in ASSET_FILES:
        if (src / name).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dst / name)
STORE_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "keep": None}


def is_orbax_checkpoint(path: str | Path) -> bool:
    return Path(path, "_CHECKPOINT_METADATA").exists()


def orbax_path(path: str | Path) -> Path:
    """The absolute form of a checkpoint path: Orbax reads and writes absolute paths only (a relative one
    reads as an empty checkpoint). Every call into Orbax takes its path from here."""
    return Path(path).expanduser().absolute()


def _nest(tree: dict, keys: tuple[str, ...], value) -> dict:
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return tree


def _stored(x: np.ndarray, dtype) -> np.ndarray:
    """One contiguous copy of a (possibly transposed, memory-mapped) tensor in the stored dtype."""
    floating = np.issubdtype(np.dtype(x.dtype), np.floating) or x.dtype == ml_dtypes.bfloat16
    if dtype is not None and floating and x.dtype != dtype:
        return x.astype(dtype, order="C")
    return np.ascontiguousarray(x)


def _staging(out: Path) -> Path:
    """Where a conversion is written before the final rename (no dots: Orbax's partial-save session
    names are `{name}.partial_save...`)."""
    return out.parent / f"{out.name.replace('.', '_')}-converting"


def _clear_staging(out: Path) -> None:
    """Removes what an interrupted conversion left (the staging folder and Orbax's partial-save folders)."""
    for leftover in out.parent.glob(f"{_staging(out).name}*"):
        shutil.rmtree(leftover, ignore_errors=True)


def convert_hf_to_orbax(hf_dir: str | Path, out: str | Path, dtype: str = "bfloat16", progress: bool = True,
                        overwrite: bool = False, batch_bytes: int = 128 * 2**20) -> Path:
    """Checks every tensor against the config, then converts one tensor group at a time, saving each
    `batch_bytes` of converted arrays as one Orbax partial save.

    Memory is bounded by batch_bytes plus the largest rule's tensors (one layer's fused experts), not the model.
    Writes into a staging folder renamed to `out` at the end: an interrupted run leaves nothing at `out`.
    """
    hf_dir, out = Path(hf_dir), orbax_path(out)
    if dtype not in STORE_DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(STORE_DTYPES)}")
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out}: already exists (pass overwrite=True / --overwrite to replace it)")
    cfg = ModelConfig.from_hf(hf_dir)
    folder = SafetensorsFolder(hf_dir)
    model_cfg = without_missing_mtp(cfg, has_mtp_tensors(folder.names()), hf_dir)
    layout = detect_layout(folder.names())
    rules = checkpoint_rules(model_cfg, *layout)
    _, _, variables = abstract_model(model_cfg, jnp.float32)
    check_tensors(folder, rules, variables, model_cfg)
    extras = sorted(n for n in folder.names() if is_skipped(n, model_cfg))
    store = STORE_DTYPES[dtype]
    _clear_staging(out)
    staging = _staging(out)
    metadata = {"format": FORMAT, "config": cfg.to_hf(), "dtype": dtype, "source": str(hf_dir),
                "mtp_fused_experts": layout.mtp_fused_experts}  # export writes the MTP experts back as they came
    bar = _progress(folder, rules, extras, progress)
    batch = _SaveBatch(staging, metadata, batch_bytes)
    for rule in rules:
        stored = [_stored(value, store) for value in rule.to_ours(*(folder.get(n) for n in rule.hf))]
        for keys, value in zip(rule.stored_keys(), stored):  # the memory maps are released by now
            batch.add(("params", *keys), value)
        del stored
        bar.update(sum(folder.file_of(n).nbytes(n) for n in rule.hf))
    for name in extras:
        batch.add(("extra", name), _stored(folder.get(name), store))
        bar.update(folder.file_of(name).nbytes(name))
    batch.flush()
    bar.close()
    ocp.partial.finalize(staging)
    copy_assets(hf_dir, staging / ASSETS)
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    return out


def save_model(model, out: str | Path, dtype: str = "float32", assets_from: str | Path | None = None,
               overwrite: bool = True, vision=None) -> Path:
    """Writes an in-memory `Qwen35` as a model checkpoint in the converter's layout (loadable by `load_model`,
    `Engine.load`, exportable with `export_to_hf`); tokenizer files are copied from `assets_from` when given;
    `vision` (a VisionEncoder, e.g. a fine-tuned tower) is stored as a conversion stores the vision tensors.
    Staged and renamed at the end, like a conversion."""
    out = orbax_path(out)
    if dtype not in STORE_DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(STORE_DTYPES)}")
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out}: already exists")
    cfg = model.config
    values = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    tree = {}
    for rule in checkpoint_rules(cfg):
        for p, keys in zip(rule.ours, rule.stored_keys()):
            value = values[p] if rule.period is None else values[p][rule.period]
            _nest(tree, ("params", *keys), _stored(np.asarray(jax.device_get(value)), STORE_DTYPES[dtype]))
    if vision is not None:
        from qwen35_jax.vision.weights import vision_to_hf
        for name, value in vision_to_hf(vision).items():
            _nest(tree, ("extra", name), _stored(value, STORE_DTYPES[dtype]))
    _clear_staging(out)
    staging = _staging(out)
    ocp.partial.save(staging, tree, custom_metadata={"format": FORMAT, "config": cfg.to_hf(), "dtype": dtype,
                                                     "source": "qwen35_jax.checkpoint.orbax_io.save_model"})
    ocp.partial.finalize(staging)
    if assets_from is not None:
        copy_assets(Path(assets_from), staging / ASSETS)
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    return out


class _SaveBatch:
    """Converted arrays waiting for one `ocp.partial.save` (fewer, larger saves than one per tensor)."""

    def __init__(self, path: Path, metadata: dict, max_bytes: int):
        self.path, self.metadata, self.max_bytes = path, metadata, max_bytes
        self.tree, self.bytes = {}, 0

    def add(self, keys: tuple[str, ...], value):
        if self.bytes and self.bytes + value.nbytes > self.max_bytes:
            self.flush()  # a large array is saved on its own rather than on top of a full batch
        _nest(self.tree, keys, value)
        self.bytes += value.nbytes
        if self.bytes >= self.max_bytes:
            self.flush()

    def flush(self):
        if self.tree:
            ocp.partial.save(self.path, self.tree, custom_metadata=self.metadata)
            self.tree, self.bytes, self.metadata = {}, 0, None


def _progress(folder, rules, extras, enabled):
    from tqdm import tqdm
    total = sum(folder.file_of(n).nbytes(n) for r in rules for n in r.hf) + \
        sum(folder.file_of(n).nbytes(n) for n in extras)
    return tqdm(total=total, unit="B", unit_scale=True, desc="converting", disable=not enabled)


def read_metadata(path: str | Path) -> dict:
    path = orbax_path(path)
    if not is_orbax_checkpoint(path):
        raise CheckpointError(f"{path}: not an Orbax checkpoint (no _CHECKPOINT_METADATA)")
    custom = ocp.metadata(path).custom_metadata or {}
    if isinstance(custom, str):
        custom = json.loads(custom)
    if custom.get("format") != FORMAT or "config" not in custom:
        raise CheckpointError(f"{path}: an Orbax checkpoint but not a {FORMAT} model checkpoint "
                              f"(custom metadata format={custom.get('format')!r})")
    return custom


def load_orbax(path: str | Path, dtype=jnp.float32, mesh=None, cfg: ModelConfig | None = None):
    """Restores a converted checkpoint as a `Qwen35` of `dtype`. With a mesh, every array is read straight
    into its target sharding (each device reads its own slice); per-layer arrays are then stacked on device."""
    path = orbax_path(path)
    cfg = cfg or ModelConfig.from_dict(read_metadata(path)["config"], where=str(path))
    stored = _stored_tree(path)
    cfg = without_missing_mtp(cfg, _has(stored, ("params", "mtp")), path)
    graphdef, state, variables = abstract_model(cfg, dtype)
    rules = checkpoint_rules(cfg)
    abstract, placement = {}, {}
    single_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    for rule in rules:
        for p, keys in zip(rule.ours, rule.stored_keys()):
            sharding = single_device if mesh is None else _slice_sharding(variables[p], mesh, rule)
            _nest(abstract, ("params", *keys), jax.ShapeDtypeStruct(layer_shape(variables[p], rule), dtype,
                                                                     sharding=sharding))
            placement.setdefault(p, []).append((rule.period, keys))
    missing = sorted("/".join(k) for p in placement for _, k in placement[p] if not _has(stored, ("params", *k)))
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks arrays the config needs: {missing[:10]}")
    if "extra" in stored:
        abstract["extra"] = jax.tree.map(lambda _: ocp.PLACEHOLDER, stored["extra"])
    loaded = ocp.load_pytree(path, abstract)["params"]
    for p, pieces in placement.items():
        values = [_get(loaded, keys) for _, keys in sorted(pieces, key=lambda x: x[0] or 0)]
        target = variables[p].get_value()
        if pieces[0][0] is None:
            value = values[0]
        else:
            value = _stacker(None if mesh is None else variable_sharding(variables[p], mesh))(*values)
        assert value.shape == target.shape, (p, value.shape, target.shape)
        variables[p].set_value(value)
    return nnx.merge(graphdef, state)


def load_extras(path: str | Path, prefix: str) -> dict[str, np.ndarray]:
    """{HF name: host array} of the tensors carried under "extra" whose names start with `prefix` (vision
    tensors, and MTP tensors of a config without MTP, as stored: float32 or bfloat16); {} when there are none."""
    path = orbax_path(path)
    stored = _stored_tree(path)
    names = [n for n in stored.get("extra", {}) if n.startswith(prefix)]
    if not names:
        return {}
    host = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    wanted = {n: jax.ShapeDtypeStruct(stored["extra"][n].shape, stored["extra"][n].dtype, sharding=host)
              for n in names}
    others = {n: ocp.PLACEHOLDER for n in stored["extra"] if n not in wanted}
    tree = ocp.load_pytree(path, {"params": jax.tree.map(lambda _: ocp.PLACEHOLDER, stored["params"]),
                                  "extra": wanted | others})
    return {n: np.asarray(tree["extra"][n]) for n in names}


@functools.lru_cache(maxsize=None)
def _stacker(sharding):
    """One jitted `stack` per target sharding (jit then caches per shape)."""
    return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=sharding)


def _slice_sharding(variable, mesh, rule: Rule):
    full = variable_sharding(variable, mesh)
    if rule.period is None:
        return full
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*full.spec[1:]))


def _stored_tree(path: Path) -> dict:
    tree = ocp.metadata(orbax_path(path)).metadata
    if not isinstance(tree, dict):
        raise CheckpointError(f"{path}: the Orbax checkpoint holds no readable array tree")
    return tree


def _has(tree, keys) -> bool:
    for k in keys:
        if not isinstance(tree, dict) or k not in tree:
            return False
        tree = tree[k]
    return True


def _get(tree, keys):
    for k in keys:
        tree = tree[k]
    return tree


def export_to_hf(ckpt: str | Path, out: str | Path, max_shard_bytes: int = 5 * 2**30, progress: bool = True,
                 overwrite: bool = False) -> Path:
    """Writes an HF folder (config.json, sharded safetensors in the released layout: `model.language_model.`
    prefix, fused experts, the MTP experts as the converted source stored them (per expert by default);
    model.safetensors.index.json) that transformers `from_pretrained` loads. An existing `out` is replaced only
    with `overwrite`."""
    ckpt, out = orbax_path(ckpt), Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out}: already exists (pass overwrite=True / --overwrite to replace it)")
    meta = read_metadata(ckpt)
    cfg = ModelConfig.from_dict(meta["config"], where=str(ckpt))
    stored = _stored_tree(ckpt)
    staging = out.parent / f"{out.name}-exporting"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    writer = ShardWriter(staging, max_shard_bytes)
    host = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])

    def abstract(tree):
        return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=host), tree)
    params = ocp.load_pytree(ckpt, jax.tree.map(lambda _: ocp.PLACEHOLDER, stored) | {
        "params": abstract(stored["params"])})
    model_cfg = without_missing_mtp(cfg, _has(stored, ("params", "mtp")), ckpt)
    for rule in checkpoint_rules(model_cfg, mtp_fused_experts=meta.get("mtp_fused_experts", False)):
        values = rule.to_hf(*(np.asarray(_get(params["params"], k)) for k in rule.stored_keys()))
        for name, value in zip(rule.hf, values):
            writer.add(name, value)
    if "extra" in stored:
        extra = ocp.load_pytree(ckpt, {"params": jax.tree.map(lambda _: ocp.PLACEHOLDER, stored["params"]),
                                       "extra": abstract(stored["extra"])})["extra"]
        for name, value in extra.items():
            writer.add(name, np.asarray(value))
    writer.close()
    copy_assets(ckpt / ASSETS, staging)
    config = cfg.to_hf()
    config.setdefault("torch_dtype", "bfloat16" if meta.get("dtype") == "bfloat16" else "float32")
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    return out
