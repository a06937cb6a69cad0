"""Memory-mapped safetensors reading with errors that name the file and tensor.

The format: an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then the raw bytes. Tensors come back as read-only numpy views of a memory map (bfloat16 via ml_dtypes),
so reading one tensor touches only its own bytes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

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
