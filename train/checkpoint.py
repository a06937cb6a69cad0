"""Training checkpoints: an Orbax CheckpointManager (async saves, keep the newest K) holding the whole train
state (parameters, optimizer state, step, RNG) and a JSON record of the run (data position, config)."""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from qwen35_jax.checkpoint.orbax_io import orbax_path


def abstract_like(state):
    """ShapeDtypeStructs with the shardings of a concrete state: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


class RunCheckpoints:
    """`save(step, state, record)` (async), `restore(step, like_state) -> (state, record)`, `latest_step()`."""

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
        self.directory = orbax_path(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "record"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, record: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        record=ocp.args.JsonSave(record)), force=True)

    def restore(self, step: int, like_state: dict) -> tuple[dict, dict]:
        """The state saved at `step`, placed like `like_state` (same tree, shapes and shardings)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_like(like_state)), record=ocp.args.JsonRestore()))
        return restored["state"], restored["record"]

    def wait(self) -> None:
        """Blocks until pending async saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
