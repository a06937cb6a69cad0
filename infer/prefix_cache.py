"""Prefix caching for a hybrid model: snapshots of a one-row decode state at prefill-chunk boundaries.

A Gated DeltaNet layer's cache is a recurrent state, not per-token KV, so a prefix can only be resumed from a
snapshot taken exactly at its end: conv + recurrent states there, plus the attention KV up to there. The engine
core snapshots after every full prefill chunk (offsets are multiples of the prefill chunk, `prefill_chunks`),
keyed by a hash of the token prefix; a new prompt resumes from its longest cached prefix and then makes exactly
the prefill calls the uncached prompt would make from there, so its outputs are bit-identical.

Snapshots live on the host (numpy; attention KV cut to the prefix), within a byte budget, least recently used
evicted first. A speculative engine's state holds the MTP block's cache as well: it is snapshotted (cut to the
prefix) with the rest.
"""

from __future__ import annotations

import collections
import hashlib

import jax
import numpy as np


def prefix_keys(token_ids: list[int], chunk: int, limit: int) -> list[tuple[int, str]]:
    """(prefix length, key) for every chunk boundary m * chunk <= limit, chained hashes of the token prefix."""
    keys, digest = [], hashlib.sha256()
    for end in range(chunk, limit + 1, chunk):
        digest.update(np.asarray(token_ids[end - chunk:end], np.int32).tobytes())
        keys.append((end, digest.copy().hexdigest()))
    return keys


class PrefixCache:
    """LRU store of one-row decode-state snapshots (numpy pytrees) under `budget_bytes`."""

    def __init__(self, budget_bytes: int, chunk: int):
        if budget_bytes < 0:
            raise ValueError(f"prefix cache budget {budget_bytes} bytes: expected >= 0")
        self.budget, self.chunk = int(budget_bytes), chunk
        self.entries: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self.bytes = self.queries = self.hits = self.hit_tokens = self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def lookup(self, token_ids: list[int]) -> tuple[int, dict | None]:
        """The longest cached prefix shorter than the prompt (at least one token must remain to prefill, for
        the logits): (its length, snapshot) or (0, None)."""
        if not self.enabled:
            return 0, None
        self.queries += 1
        for end, key in reversed(prefix_keys(token_ids, self.chunk, len(token_ids) - 1)):
            if key in self.entries:
                self.entries.move_to_end(key)
                self.hits += 1
                self.hit_tokens += end
                return end, self.entries[key]
        return 0, None

    def wants(self, token_ids: list[int], end: int) -> str | None:
        """The key to store a snapshot of the prefix [0, end) under, or None (disabled, or already held)."""
        if not self.enabled or end % self.chunk:
            return None
        key = prefix_keys(token_ids, self.chunk, end)[-1][1]
        if key in self.entries:
            self.entries.move_to_end(key)
            return None
        return key

    def store(self, key: str, state: dict, end: int) -> None:
        """Stores a one-row decode state holding exactly the prefix [0, end) (attention KV cut to `end`)."""
        snapshot = jax.tree.map(np.asarray, jax.device_get(state))

        def cut(layer):
            return {name: (value[..., :end, :, :] if name in ("k", "v") else value) for name, value in layer.items()}
        snapshot["layers"] = [cut(layer) for layer in snapshot["layers"]]
        if "mtp" in snapshot:  # speculative decoding: the MTP block's cache, complete up to `end` too
            snapshot["mtp"] = cut(snapshot["mtp"])
        size = sum(leaf.nbytes for leaf in jax.tree.leaves(snapshot))
        if size > self.budget:
            return
        while self.bytes + size > self.budget:
            _, old = self.entries.popitem(last=False)
            self.bytes -= sum(leaf.nbytes for leaf in jax.tree.leaves(old))
            self.evictions += 1
        self.entries[key] = snapshot
        self.bytes += size

    @staticmethod
    def restore(snapshot: dict, empty: dict) -> dict:
        """A one-row decode state shaped and placed like `empty` (a fresh state) holding the snapshot's prefix;
        attention KV past the prefix are zeros, as in a state that prefilled the prefix itself."""
        def fill(value, like):
            full = np.zeros(like.shape, like.dtype)
            full[tuple(slice(0, n) for n in value.shape)] = value
            # placed exactly like the fresh state (committed or not), so the prefill step is not recompiled
            return jax.device_put(full, like.sharding) if like.committed else jax.device_put(full)
        return jax.tree.map(fill, snapshot, empty)
