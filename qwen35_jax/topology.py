"""TPU slices as compile targets on a host without TPUs: devices for ahead-of-time compilation.

`topology_devices("v5p-256")` returns the slice's compile-only TPU devices (one per chip, from
`jax.experimental.topologies.get_topology_desc`, served by libtpu without any TPU attached). A mesh over
them (`sharding.make_mesh(spec, devices=...)`) lowers and compiles with the TPU compiler itself:
`jax.jit(f).lower(*abstract_args).compile().memory_analysis()` gives the TPU's per-device byte counts
(TPU layouts and padding included), and a program over its HBM fails to compile with
`RESOURCE_EXHAUSTED: ... CompileTimeHbmOom`. The compiled programs are for that slice; nothing runs here.

Requirements: libtpu (`pip install "qwen35-jax[tpu]"`, which installs it on Python >= 3.12 only; tested
with jax 0.12.0.1 and libtpu 0.0.52).

Coexistence with the CPU backend: the TPU devices come from libtpu's PJRT plugin, loaded on the first
call, independently of `jax_platforms`; `jax_platforms="cpu"` (what the dry-run and the tests set) and
`jax_num_cpu_devices` keep working, and `jax.devices()` stays the CPU devices. Before JAX or libtpu
starts, `prepare_for_topology()` sets the environment libtpu reads (topology_devices calls it too, which is
enough unless JAX's own backend start-up loads libtpu first: with `jax_platforms` unset and libtpu
installed, it does, so call prepare_for_topology before JAX starts in that case):

* ALLOW_MULTIPLE_LIBTPU_LOAD=1: libtpu holds /tmp/libtpu_lockfile for the process's lifetime; a second
  process on the host (pytest workers, a concurrent dry-run) otherwise fails with "ABORTED: Internal
  error when accessing libtpu multi-process lockfile". With no TPU attached there is nothing to share.
* TPU_SKIP_MDS_QUERY=1: no GCE metadata-server lookups (JAX sets it too when it sees no TPU on PCI).

While libtpu initialises, TPU_ACCELERATOR_TYPE and TPU_WORKER_HOSTNAMES are set (to the slice name and
"localhost"), unless already set, and restored afterwards; without them libtpu prints warnings and an
INVALID_ARGUMENT log line (harmless). They do not constrain which slices can be built afterwards.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import re
from dataclasses import dataclass

GiB = 2**30

# Per generation: HBM per chip (nominal; the TPU compiler's usable figure is a little lower: 95.73G on
# v5p, 15.75G on v5e, 31.24G on v6e, from its CompileTimeHbmOom messages), libtpu's chip config, and the
# name libtpu gives the generation in topology names.
_GENERATIONS = {
    "v5p": dict(hbm_bytes=95 * GiB, chip_config_name="megacore", libtpu_name="v5p"),
    "v5e": dict(hbm_bytes=16 * GiB, chip_config_name="default", libtpu_name="v5e"),
    "v6e": dict(hbm_bytes=32 * GiB, chip_config_name="default", libtpu_name="v6e"),
}
_ALIASES = {"v5litepod": "v5e", "v6litepod": "v6e", "v5lite": "v5e", "v6lite": "v6e"}

# v5e / v6e: 2D slices of a 16x16 pod, named by chips.
_2D_TOPOLOGIES = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
                  256: (16, 16)}
# v5p: slices smaller than a 4x4x4 cube, named by TensorCores (2 a chip).
_V5P_SMALL = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4)}
_V5P_MAX_CHIPS = 8960  # a v5p pod (16x20x28)

ACCEPTED_FORMS = ("v5p-N (N TensorCores, 2 a chip: v5p-8 .. v5p-17920; from 128, N a multiple of 128)",
                  "v5e-N or v5litepod-N (N chips: 1, 4, 8, 16, 32, 64, 128, 256)",
                  "v6e-N (N chips: 1, 4, 8, 16, 32, 64, 128, 256)")


@dataclass(frozen=True)
class SliceSpec:
    """One TPU slice: `chips` JAX devices (a v5p chip's two TensorCores act as one megacore device)."""
    generation: str        # "v5p", "v5e" or "v6e"
    name: str              # canonical name, e.g. "v5p-256"
    chips: int
    hbm_bytes: int         # per chip
    topology: str          # chip grid, e.g. "4x4x8"

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.topology.split("x"))

    @property
    def topology_name(self) -> str:
        """The name libtpu takes, e.g. "v5p:4x4x8"."""
        return f"{_GENERATIONS[self.generation]['libtpu_name']}:{self.topology}"

    @property
    def chip_config_name(self) -> str:
        return _GENERATIONS[self.generation]["chip_config_name"]

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        """Chips per host VM as in the real machines: 4 (2x2), 8 on single-host v5e/v6e slices, 1 on x1."""
        if self.chips == 1:
            return (1, 1, 1)
        if self.generation != "v5p" and self.chips == 8:
            return (2, 4, 1)
        return (2, 2, 1)

    @property
    def wrap(self) -> tuple[bool, bool, bool]:
        """Wraparound (torus) links per dimension: v5p slices of whole 4x4x4 cubes; v5e/v6e full 16-chip
        sides."""
        dims = self.dims + (1,) * (3 - len(self.dims))
        if self.generation == "v5p":
            cubes = self.chips >= 64
            return (cubes, cubes, cubes)
        return tuple(d == 16 for d in dims[:2]) + (False,)


def _v5p_grid(chips: int) -> tuple[int, int, int] | None:
    """The chip grid of a v5p slice: the small fixed shapes, else the most cube-like grid of 4x4x4 cubes
    (smallest longest side, then largest shortest side), e.g. 128 -> 4x4x8, 3456 -> 12x12x24."""
    if chips in _V5P_SMALL:
        return _V5P_SMALL[chips]
    if chips % 64 or not 64 <= chips <= _V5P_MAX_CHIPS:
        return None
    cubes = chips // 64
    best = None
    for p in range(1, round(cubes ** (1 / 3)) + 2):
        if cubes % p:
            continue
        for q in range(p, math.isqrt(cubes // p) + 1):
            if (cubes // p) % q:
                continue
            r = cubes // p // q
            key = (r, -p)
            if best is None or key < best[0]:
                best = (key, (4 * p, 4 * q, 4 * r))
    return best[1] if best else None


def parse_slice(name: str) -> SliceSpec:
    """"v5p-256" -> SliceSpec(generation="v5p", chips=128, topology="4x4x8", ...). v5p names count
    TensorCores (2 a chip); v5e (v5litepod) and v6e names count chips. ValueError for anything else."""
    def bad(why: str) -> ValueError:
        return ValueError(f"unknown TPU slice {name!r}: {why}; accepted: " + "; ".join(ACCEPTED_FORMS))

    m = re.fullmatch(r"\s*([a-z0-9]+)-(\d+)\s*", str(name).lower())
    if not m:
        raise bad("expected <generation>-<size>")
    generation, size = _ALIASES.get(m.group(1), m.group(1)), int(m.group(2))
    if generation not in _GENERATIONS:
        raise bad(f"generation {m.group(1)!r} is not one of {sorted(_GENERATIONS)}")
    if generation == "v5p":
        grid = _v5p_grid(size // 2) if size % 2 == 0 else None
        if grid is None:
            raise bad(f"no v5p slice has {size} TensorCores")
        chips = size // 2
    else:
        if size not in _2D_TOPOLOGIES:
            raise bad(f"no {generation} slice has {size} chips")
        grid, chips = _2D_TOPOLOGIES[size], size
    return SliceSpec(generation=generation, name=f"{generation}-{size}", chips=chips,
                     hbm_bytes=_GENERATIONS[generation]["hbm_bytes"], topology="x".join(map(str, grid)))


def has_libtpu() -> bool:
    """Whether libtpu can be loaded (the package is importable, or TPU_LIBRARY_PATH names a file);
    imports and initialises nothing."""
    path = os.environ.get("TPU_LIBRARY_PATH")
    if path and os.path.isfile(path):
        return True
    try:
        return importlib.util.find_spec("libtpu") is not None
    except (ImportError, ValueError):
        return False


def prepare_for_topology() -> None:
    """Sets (unless already set) the environment libtpu reads when it loads; see the module docstring.
    Call before JAX starts when `jax_platforms` is unset; harmless to call more than once."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")


@contextlib.contextmanager
def _quiet_libtpu_init(spec: SliceSpec):
    """TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES while libtpu initialises (silences its warnings),
    restored afterwards so that nothing else (multi-host detection) sees them."""
    added = {k: v for k, v in (("TPU_ACCELERATOR_TYPE", spec.name), ("TPU_WORKER_HOSTNAMES", "localhost"))
             if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def topology_devices(name: str, num_slices: int = 1) -> list:
    """The compile-only TPU devices of slice `name` (times `num_slices`, joined over DCN), one per chip,
    for meshes to AOT-compile against. RuntimeError when libtpu is missing."""
    spec = parse_slice(name)
    if num_slices < 1:
        raise ValueError(f"num_slices must be >= 1, got {num_slices}")
    if not has_libtpu():
        raise RuntimeError(f"compiling for {spec.name} needs libtpu, which is not installed: "
                           'pip install "qwen35-jax[tpu]" (on Python >= 3.12)')
    prepare_for_topology()
    from jax.experimental.topologies import get_topology_desc
    with _quiet_libtpu_init(spec):
        desc = get_topology_desc(platform="tpu", topology_name=spec.topology_name,
                                 chip_config_name=spec.chip_config_name,
                                 chips_per_host_bounds=spec.chips_per_host_bounds,
                                 num_slices=num_slices, wrap=spec.wrap)
    devices = list(desc.devices)
    if len(devices) != spec.chips * num_slices:
        raise RuntimeError(f"libtpu built {len(devices)} devices for {spec.name} x{num_slices}, "
                           f"expected {spec.chips * num_slices}")
    return devices
