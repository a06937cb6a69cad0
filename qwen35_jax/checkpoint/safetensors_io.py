"""Safetensors: memory-mapped reading with errors that name the file and tensor, and sharded writing.

The format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then the raw bytes. Tensors come back as read-only numpy views of a memory map (bfloat16 via ml_dtypes),
so reading one tensor touches only its own bytes.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
MAX_HEADER_BYTES = 100_000_000


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and tensor."""


class SafetensorsFile:
    """One .safetensors file: `names()`, `shape(name)`, `dtype(name)`, `get(name) -> np.ndarray`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"{self.path}: corrupt safetensors header (header length {header_len} "
                                      f"but the file has {size} bytes)")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header (not JSON: {e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (expected a JSON object)")
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        self._entries = {}
        for name, entry in header.items():
            self._entries[name] = self._check_entry(name, entry, size - self._data_start)

    def _check_entry(self, name, entry, data_bytes):
        try:
            dtype, shape, (start, end) = DTYPES[entry["dtype"]], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{self.path}: corrupt header entry for tensor {name!r}: {entry!r}") from None
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if end - start != expected or start < 0:
            raise CheckpointError(f"{self.path}: tensor {name!r} has {end - start} bytes but dtype "
                                  f"{entry['dtype']} x shape {list(shape)} needs {expected}")
        if end > data_bytes:
            raise CheckpointError(f"{self.path}: truncated file: tensor {name!r} ends at byte "
                                  f"{self._data_start + end} but the file has {self._data_start + data_bytes}")
        return dtype, shape, start

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(self._entries[name][0])

    def nbytes(self, name: str) -> int:
        dtype, shape, _ = self._entries[name]
        return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory map of its own bytes, unmapped when the array is dropped
        (so reading a checkpoint tensor by tensor keeps memory bounded by the tensors alive)."""
        dtype, shape, start = self._entries[name]
        if not shape or 0 in shape:
            return np.zeros(shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self._data_start + start, shape=shape)


class SafetensorsFolder:
    """All tensors of an HF checkpoint folder (one file, or several listed by an index)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e!r})") from None
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (self.folder / s).exists()]
            if missing:
                raise CheckpointError(f"{index}: names shard files that are missing from {self.folder}: {missing}")
        else:
            shards = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not shards:
                raise CheckpointError(f"{self.folder}: no *.safetensors files and no model.safetensors.index.json")
            weight_map = None
        self.files = {s: SafetensorsFile(self.folder / s) for s in shards}
        self._where = {}
        for shard, f in self.files.items():
            for name in f.names():
                if weight_map is not None and weight_map.get(name) != shard:
                    raise CheckpointError(f"{f.path}: tensor {name!r} is not listed for this file in {index}")
                self._where[name] = f
        if weight_map is not None:
            absent = sorted(set(weight_map) - set(self._where))
            if absent:
                raise CheckpointError(f"{index}: lists tensors absent from their shard files: {absent[:10]}")

    def names(self) -> list[str]:
        return list(self._where)

    def file_of(self, name: str) -> SafetensorsFile:
        return self._where[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def get(self, name: str) -> np.ndarray:
        return self._where[name].get(name)


class ShardWriter:
    """Writes tensors into `folder` as HF-style safetensors shards of at most `max_bytes` each
    (`model-00001-of-0000N.safetensors`) and, on `close()`, the `model.safetensors.index.json` naming them."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending, self.pending_bytes, self.shards = {}, 0, []

    def add(self, name: str, value: np.ndarray):
        if self.pending and self.pending_bytes + value.nbytes > self.max_bytes:
            self._flush()
        self.pending[name] = np.ascontiguousarray(value)
        self.pending_bytes += value.nbytes

    def _flush(self):
        file = f"model-{len(self.shards) + 1:05d}.safetensors"
        save_file(self.pending, self.folder / file, metadata={"format": "pt"})
        self.shards.append((file, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self):
        if self.pending:
            self._flush()
        n = len(self.shards)
        weight_map, total = {}, 0
        for i, (file, names) in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / file, self.folder / final)
            weight_map.update({name: final for name in names})
        for file in self.folder.glob("*.safetensors"):
            total += file.stat().st_size
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
