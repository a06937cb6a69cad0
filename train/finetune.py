"""`python -m train.finetune --config RECIPE.yaml|NAME [key=value ...] [--resume]`: fine-tune (or train
from a preset's random init) with AdamW, logging to the console and a JSON-lines file, evaluating on held-out
data, checkpointing with Orbax, and saving the final weights as a model checkpoint (optionally exported to HF). With
`lora`, checkpoints hold the adapters and their optimizer state only; the run ends with the merged model in
`output_dir/final` and the adapter alone, in PEFT's layout, in `output_dir/adapter`."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from qwen35_jax.checkpoint.orbax_io import ASSETS, export_to_hf, is_orbax_checkpoint, save_model
from qwen35_jax.cli import argument_parser, command
from qwen35_jax.config import ModelConfig
from qwen35_jax.loading import load_model, load_vision_tower, resolve_dtype, shard_model
from qwen35_jax.nn.model import Qwen35
from qwen35_jax.sharding import make_mesh
from qwen35_jax.tokenizer import Tokenizer
from qwen35_jax.vision.encoder import VisionEncoder
from qwen35_jax.vision.processing import processor_configs
from train.checkpoint import RunCheckpoints
from train.config import TrainConfig, TrainConfigError, recipe_names
from train.data import PackedDataset, load_dataset
from train.lora import export_peft
from train.plot import write_loss_plot
from train.step import Trainer
from train.vision_data import VisionData


class TrainingDiverged(RuntimeError):
    pass


def build_model(tc: TrainConfig, mesh=None) -> Qwen35:
    """From an Orbax checkpoint or HF folder (tc.model is a path; an Orbax checkpoint is read straight into the
    mesh's shardings), else a preset / config.json with random init (then placed on the mesh)."""
    dtype = resolve_dtype(tc.param_dtype)
    path = Path(tc.model)
    if path.is_dir():
        if tc.model_overrides:
            raise TrainConfigError(f"model_overrides apply to random init only, but model={tc.model} is a checkpoint")
        # master weights in param_dtype as asked (the trainer casts them to compute_dtype itself)
        return load_model(path, dtype, mesh=mesh, scan_layers=tc.scan_layers, compute_dtype=dtype)
    import dataclasses
    known = {f.name for f in dataclasses.fields(ModelConfig)} - {"scan_layers"}
    unknown = sorted(set(tc.model_overrides) - known)
    if unknown:
        raise TrainConfigError(f"model_overrides: unknown model config field(s) {unknown}; known: {sorted(known)}")
    cfg = ModelConfig.from_hf(tc.model, **tc.model_overrides, scan_layers=tc.scan_layers)
    model = Qwen35(cfg, dtype, nnx.Rngs(tc.seed))
    return model if mesh is None else shard_model(model, mesh)


def vision_data(tc: TrainConfig, cfg: ModelConfig) -> VisionData | None:
    """What tokenizing images and videos needs, for a model with a vision tower: its config and the
    checkpoint's processor configs (the released Qwen3.5 values for a preset)."""
    if cfg.vision is None:
        return None
    path = Path(tc.model)
    folders = (path, path / ASSETS) if path.is_dir() else ()
    return VisionData(cfg.vision, *processor_configs(*folders))


def build_vision_tower(tc: TrainConfig, cfg: ModelConfig, mesh=None) -> VisionEncoder:
    """The vision tower the data's images and videos need: the checkpoint's (tc.model a path), else random init."""
    dtype = resolve_dtype(tc.param_dtype)
    if Path(tc.model).is_dir():
        tower = load_vision_tower(tc.model, dtype, mesh=mesh, compute_dtype=dtype)
        if tower is None:
            raise TrainConfigError(f"model={tc.model}: the training data has images or videos but the checkpoint "
                                   "holds no vision tower tensors (model.visual.*)", key="model")
        return tower
    tower = VisionEncoder(cfg.vision, dtype, nnx.Rngs(tc.seed + 1))
    return tower if mesh is None else shard_model(tower, mesh)


def tokenizer_folder(tc: TrainConfig) -> Path:
    if tc.tokenizer:
        return Path(tc.tokenizer)
    path = Path(tc.model)
    if is_orbax_checkpoint(path):
        return path / ASSETS
    if path.is_dir():
        return path
    raise TrainConfigError(f"model={tc.model!r} is a preset (random init): set `tokenizer` to a tokenizer folder")


# Config keys a resumed run may change: they do not touch the training trajectory.
RESUMABLE_CHANGES = {"moe_backend", "output_dir", "save_every", "keep_checkpoints", "eval_data", "eval_every", "eval_batches",
                     "log_every", "export_hf"}


def _data_digest(data: PackedDataset) -> str:
    import hashlib
    digest = hashlib.sha256()
    for key in sorted(data.rows):
        digest.update(np.ascontiguousarray(data.rows[key]).tobytes())
    return digest.hexdigest()


def _record(tc: TrainConfig, step: int, data: PackedDataset, digest: str) -> dict:
    return {"step": step, "epoch": data.epoch_of(step, tc.batch_size), "rows": len(data), "data_sha256": digest,
            "config": tc.to_dict()}


def _check_resume(record: dict, tc: TrainConfig, digest: str, where: Path) -> None:
    """Resuming is exact only with the same data and every config key that shapes the trajectory."""
    saved = record.get("config", {})
    changed = sorted(k for k, v in tc.to_dict().items() if k not in RESUMABLE_CHANGES and saved.get(k) != v)
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {getattr(tc, k)!r}" for k in changed)
        raise TrainConfigError(f"{where}: cannot resume exactly: {diffs} changed since the checkpoint (start a new "
                               "run from its weights instead)")
    if record.get("data_sha256") != digest:
        raise TrainConfigError(f"{where}: cannot resume exactly: the packed training data differ from the "
                               "checkpoint's (files edited?)")


def _trim_log(path: Path, step: int) -> None:
    """Drops log lines of steps after `step` (written after the checkpoint a resumed run restarts from)."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))


def evaluate(trainer: Trainer, params, data: PackedDataset, tc: TrainConfig) -> float:
    """Mean cross-entropy over the first tc.eval_batches x tc.batch_size rows of the held-out set, in order,
    each row once (a short last batch is filled with empty rows that count nothing)."""
    total = count = 0.0
    n = len(data)
    for start in range(0, min(n, tc.eval_batches * tc.batch_size), tc.batch_size):
        index = np.arange(start, start + tc.batch_size)
        batch = data.gather(np.minimum(index, n - 1))
        for key in data.rows:  # rows past the end: empty (padding everywhere, no vision tokens)
            value, fill = batch[key], -1 if key == "vision_index" else 0
            real = (index < n).reshape((-1,) + (1,) * (value.ndim - 1))
            batch[key] = np.where(real, value, fill).astype(value.dtype)
        m = jax.device_get(trainer.eval_step(params, trainer.put_batch(batch)))
        total, count = total + float(m["ce_sum"]), count + float(m["tokens"])
    return total / max(count, 1.0)


def run(tc: TrainConfig, resume: bool = False, progress: bool = True, stop_after: int | None = None) -> dict:
    """Trains per `tc`. Returns {"step", "loss", "eval_loss", "final": model checkpoint path, ...} ("mtp_loss" too
    with mtp_loss_weight > 0).

    stop_after: end this invocation after that many total steps, with a checkpoint, as a preemption would
    (no final model then); a later `run(tc, resume=True)` continues exactly."""
    out = Path(tc.output_dir)
    mesh = make_mesh(tc.mesh) if tc.mesh else None
    model = build_model(tc, mesh)
    tokenizer = Tokenizer.load(tokenizer_folder(tc))
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise TrainConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                               f"{model.config.vocab_size}")
    if not tc.train_data:
        raise TrainConfigError("train_data: no training files given")
    vision = vision_data(tc, model.config)
    data = load_dataset(tc.train_data, tokenizer, tc.seq_len, tc.overflow, tc.add_eos, vision=vision)
    held_out = (load_dataset(tc.eval_data, tokenizer, tc.seq_len, tc.overflow, tc.add_eos, vision=vision)
                if tc.eval_data else None)
    with_media = any(d is not None and d.media is not None for d in (data, held_out))
    trainer = Trainer(model, tc, mesh, vision=build_vision_tower(tc, model.config, mesh) if with_media else None)
    del model
    state = trainer.init_state(trainer.release_params())  # the model's arrays become the state (no copy)
    digest = _data_digest(data)
    checkpoints = RunCheckpoints(out / "checkpoints", tc.keep_checkpoints)
    start = checkpoints.latest_step()
    if start is not None and not resume:
        raise TrainConfigError(f"{out}: holds checkpoints (latest step {start}); pass --resume to continue them, "
                               "or choose another output_dir")
    if start is not None:
        state, record = checkpoints.restore(start, state)
        _check_resume(record, tc, digest, checkpoints.directory)
        _trim_log(out / "log.jsonl", start)
    start = start or 0
    end = tc.steps if stop_after is None else min(stop_after, tc.steps)
    summary = _train_loop(trainer, state, data, held_out, checkpoints, tc, start, end, out, progress, digest)
    checkpoints.close()
    if end < tc.steps:
        summary.pop("params")
        return summary
    params = summary.pop("params")
    if trainer.lora is not None:  # the adapter alone, in PEFT's layout, beside the merged model
        summary["adapter"] = str(export_peft(trainer.lora, params, out / "adapter", base_model=tc.model))
    trained = trainer.model(params)
    final = save_model(trained, out / "final", assets_from=tokenizer_folder(tc),
                       vision=getattr(trained, "visual", None))
    summary["final"] = str(final)
    if tc.export_hf:
        summary["export_hf"] = str(export_to_hf(final, tc.export_hf, progress=progress, overwrite=True))
    return summary


def _train_loop(trainer, state, data, held_out, checkpoints, tc, start, end, out, progress, digest) -> dict:
    from tqdm import tqdm
    log = open(out / "log.jsonl", "a")
    bar = tqdm(total=tc.steps, initial=start, desc="training", disable=not progress, dynamic_ncols=True)
    summary = {"step": start, "loss": None, "eval_loss": None}
    last_saved = start if start > 0 else None
    try:
        for step in range(start, end):
            t0 = time.perf_counter()
            state, metrics = trainer.train_step(state, trainer.put_batch(data.batch(step, tc.batch_size, tc.seed)))
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            seconds = time.perf_counter() - t0
            done = step + 1
            if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                checkpoints.wait()
                last = "no checkpoint was saved yet" if last_saved is None else \
                    f"Last good checkpoint: step {last_saved} in {checkpoints.directory}"
                raise TrainingDiverged(
                    f"step {done}: loss={metrics['loss']} grad_norm={metrics['grad_norm']} is not finite; the run "
                    f"stopped without applying this update. {last} (lower the learning_rate and start a new run "
                    "from it)")
            entry = {"step": done, **metrics, "tokens_per_second": metrics["tokens"] / seconds,
                     "epoch": data.epoch_of(done, tc.batch_size)}
            summary.update(step=done, loss=metrics["loss"])
            if "mtp_loss" in metrics:
                summary["mtp_loss"] = metrics["mtp_loss"]
            if held_out is not None and (done % tc.eval_every == 0 or done == tc.steps):
                entry["eval_loss"] = summary["eval_loss"] = evaluate(trainer, state["params"], held_out, tc)
                bar.write(f"step {done}: eval loss {entry['eval_loss']:.4f}")
            if done % tc.log_every == 0 or done == tc.steps or "eval_loss" in entry:
                log.write(json.dumps(entry) + "\n")
                log.flush()
            if "eval_loss" in entry:
                write_loss_plot(log.name)
            mtp = {"mtp": f"{metrics['mtp_loss']:.4f}"} if "mtp_loss" in metrics else {}
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", **mtp, lr=f"{metrics['lr']:.2e}",
                            gnorm=f"{metrics['grad_norm']:.3f}", tok_s=f"{entry['tokens_per_second']:.0f}")
            bar.update(1)
            if done % tc.save_every == 0 or done == end:
                checkpoints.save(done, state, _record(tc, done, data, digest))
                last_saved = done
    finally:
        bar.close()
        log.close()
        checkpoints.wait()
        write_loss_plot(log.name)  # train and held-out loss so far, beside log.jsonl
    summary["params"] = state["params"]
    return summary


@command(failures=(TrainingDiverged,))
def main(argv=None) -> int:
    parser = argument_parser(__doc__.split("\n\n")[0], module=__name__, epilog=TrainConfig.help_text())
    parser.add_argument("--config", help="YAML training config, or a bundled recipe name (train/recipes/: "
                                         f"{', '.join(recipe_names())}); without it, the defaults below")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides (values parsed as YAML), anywhere on the command line")
    dry = parser.add_argument_group("dry run (compile this run's train step for a mesh; nothing allocated, nothing "
                                    "trained: python -m qwen35_jax.dryrun --mode train --config ...)")
    dry.add_argument("--dry-run", action="store_true", help="report the step's memory, FLOPs and collectives")
    dry.add_argument("--devices", type=int, help="fake CPU devices")
    dry.add_argument("--topology", help="a TPU slice to compile for, e.g. v5p-256 (needs libtpu)")
    dry.add_argument("--mesh", help="default: the config's mesh")
    dry.add_argument("--chip", help="estimate step time and MFU for this chip (v5p, v5e, v6e, h100, h200)")
    dry.add_argument("--hbm", help="memory per device, e.g. 95GiB")
    dry.add_argument("--json", action="store_true", help="end with one JSON line of the report")
    args = parser.parse_intermixed_args(argv)
    tc = TrainConfig.load(args.config, args.overrides)
    if args.dry_run:
        return _dry_run(args, tc)
    if any(getattr(args, k) for k in ("devices", "topology", "mesh", "chip", "hbm", "json")):
        raise TrainConfigError("--devices/--topology/--mesh/--chip/--hbm/--json apply to --dry-run only (set the "
                               "training mesh with mesh=SPEC)")
    summary = run(tc, resume=args.resume, progress=not args.no_progress)
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, np.ndarray)}))
    return 0


def _dry_run(args, tc: TrainConfig) -> int:
    """Hands the run's exact TrainConfig to the dry-run (train/dryrun.py)."""
    from train import dryrun
    mesh = args.mesh or tc.mesh
    if not mesh:
        raise TrainConfigError("--dry-run needs a mesh: --mesh SPEC or mesh= in the config")
    argv = ["--mode", "train", "--mesh", mesh, *(["--config", args.config] if args.config else [])]
    for flag in ("devices", "topology", "chip", "hbm"):
        if getattr(args, flag):
            argv += [f"--{flag}", str(getattr(args, flag))]
    return dryrun.dry_run(argv + (["--json"] if args.json else []) + list(args.overrides), use_recipe_defaults=False)


if __name__ == "__main__":
    sys.exit(main())
