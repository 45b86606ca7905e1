"""The maps a worker can steer with at once: a bounded bank of device slots sized at start.

Like vLLM's multi-LoRA serving (`max_loras` device slots, a `max_cpu_loras` host cache,
LRU eviction, pinning), the worker holds every loaded version's map on the host in the form
it was stored (`CompactMap`), and copies the maps a step needs into preallocated device
slots. The bank's buffers are allocated once, when the worker attaches (after the weights
load, before vLLM profiles memory and sizes the KV cache, so on a GPU they are counted in
that profile and a load later can never take memory the KV cache was given):

    down [slots + 1, L, d, R]   D^T (full maps), V^T (low-rank maps, zero-padded to R)
    up   [slots + 1, L, R, d]   U^T (low-rank maps); absent in a full bank (R = d)
    bias [slots + 1, L, d]

in the engine's dtype; slot 0 is the no-op slot (all zeros), which a graph-safe op (a
separate issue) can point unsteered rows at. Which form a slot holds, and its rank, are
read on the host when a step is planned, never inside the op: a shift-only map is served
from its bias with no matmul, a low-rank map of rank r costs r (2 d) per row and layer.
"""

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import torch

# How `vllm serve` users size the bank (`lingosteer serve` sets them from its options).
MAX_LANGUAGES_ENV = "LINGOSTEER_MAX_LANGUAGES"
MAX_CPU_LANGUAGES_ENV = "LINGOSTEER_MAX_CPU_LANGUAGES"
MAX_MAP_RANK_ENV = "LINGOSTEER_MAX_MAP_RANK"
# Defaults for a 7B model (d = 4096, 32 layers, bf16) on one 80 GB GPU. Full maps by default, because
# the recommended fitting recipe (alignment.recipe.RECOMMENDED) stores full d x d maps: a full slot is
# 32 x 4096^2 x 2 B = 1.07 GB, so 4 slots take 4.3 GB (5% of the card) from the KV cache; 16 host copies
# are 17 GB of host memory. Low-rank maps serve many more languages for the same memory:
# `--max-map-rank 64 --max-languages 16` is 0.55 GB (34 MB a slot).
DEFAULT_MAX_LANGUAGES = 4
DEFAULT_MAX_CPU_LANGUAGES = 16
DEFAULT_MAX_MAP_RANK = None

Form = Literal["full", "lowrank", "shift"]


class CapacityError(ValueError):
    """A map, or a pin, that the bank as configured cannot hold."""


@dataclass(frozen=True)
class BankConfig:
    max_languages: int = DEFAULT_MAX_LANGUAGES  # device slots
    max_cpu_languages: int = DEFAULT_MAX_CPU_LANGUAGES  # maps held on the host; the rest are re-read from disk
    max_map_rank: int | None = DEFAULT_MAX_MAP_RANK  # None: "full", d x d slots

    def __post_init__(self) -> None:
        if self.max_languages < 1:
            raise ValueError(f"--max-languages ({MAX_LANGUAGES_ENV}) must be at least 1, got {self.max_languages}")
        if self.max_cpu_languages < self.max_languages:
            raise ValueError(f"--max-cpu-languages ({MAX_CPU_LANGUAGES_ENV}) must be at least --max-languages "
                             f"({self.max_languages}), got {self.max_cpu_languages}")
        if self.max_map_rank is not None and self.max_map_rank < 1:
            raise ValueError(f"--max-map-rank ({MAX_MAP_RANK_ENV}) must be a positive rank or 'full', "
                             f"got {self.max_map_rank}")

    @classmethod
    def from_env(cls) -> "BankConfig":
        rank = os.environ.get(MAX_MAP_RANK_ENV)
        return cls(
            max_languages=int(os.environ.get(MAX_LANGUAGES_ENV, DEFAULT_MAX_LANGUAGES)),
            max_cpu_languages=int(os.environ.get(MAX_CPU_LANGUAGES_ENV, DEFAULT_MAX_CPU_LANGUAGES)),
            max_map_rank=DEFAULT_MAX_MAP_RANK if rank is None else parse_map_rank(rank),
        )

    def env(self) -> dict[str, str]:
        """The environment that makes `from_env` return this configuration in vLLM's worker."""
        return {
            MAX_LANGUAGES_ENV: str(self.max_languages),
            MAX_CPU_LANGUAGES_ENV: str(self.max_cpu_languages),
            MAX_MAP_RANK_ENV: "full" if self.max_map_rank is None else str(self.max_map_rank),
        }


def parse_map_rank(text: str) -> int | None:
    """`--max-map-rank` / LINGOSTEER_MAX_MAP_RANK: a positive rank, or "full" (None)."""
    return None if text == "full" else int(text)


@dataclass(frozen=True)
class CompactMap:
    """One version's map as stored, on the host, in the engine's dtype. Row i of each tensor is
    model layer `layers[i]`; the update of a row vector h is h @ down @ up + b (no `up`: h @ down + b;
    no `down`: b alone)."""

    form: Form
    layers: tuple[int, ...]
    down: torch.Tensor | None  # [n, d, r]: D^T (full, r = d) or V^T (lowrank); None for shift
    up: torch.Tensor | None  # [n, r, d]: U^T (lowrank only)
    bias: torch.Tensor  # [n, d]

    @property
    def rank(self) -> int:
        return 0 if self.down is None else self.down.shape[2]

    @property
    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.down, self.up, self.bias) if t is not None)


@dataclass(frozen=True)
class MapView:
    """Where one step reads a version's map: views of a bank slot (or, past the slots, of the host copy)."""

    down: torch.Tensor | None  # [L or n, d, r]
    up: torch.Tensor | None  # [L or n, r, d]
    bias: torch.Tensor  # [L or n, d]
    index: dict[int, int]  # model layer -> first index of the tensors above


class DeviceBank:
    """The preallocated slots and which version each holds, least recently used first."""

    def __init__(self, config: BankConfig, num_layers: int, hidden_size: int, dtype: torch.dtype,
                 device: torch.device):
        self.config = config
        self.hidden_size = hidden_size
        slots = config.max_languages + 1  # slot 0: the no-op slot
        self.rank_cap = hidden_size if config.max_map_rank is None else config.max_map_rank
        self.down = torch.zeros(slots, num_layers, hidden_size, self.rank_cap, dtype=dtype, device=device)
        self.up = None if config.max_map_rank is None else torch.zeros(
            slots, num_layers, self.rank_cap, hidden_size, dtype=dtype, device=device)
        self.bias = torch.zeros(slots, num_layers, hidden_size, dtype=dtype, device=device)
        self.layer_mask = torch.zeros(slots, num_layers, dtype=torch.bool, device=device)
        self.device = device
        self.slot_of: OrderedDict[str, int] = OrderedDict()  # version -> slot, least recently used first
        self.evictions = 0
        self.swaps_in = 0  # copies of a host map into a slot
        self.overflows = 0  # versions a step served from the host copy because every slot was needed

    @property
    def dtype(self) -> torch.dtype:
        return self.bias.dtype

    @property
    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.down, self.up, self.bias, self.layer_mask)
                   if t is not None)

    def check_fits(self, compact: CompactMap, where: str) -> None:
        """Refuse a map no slot can hold, naming the cap and how to raise it."""
        if compact.rank > self.rank_cap:
            kind = "a full d x d map" if compact.form == "full" else f"a rank-{compact.rank} map"
            raise CapacityError(
                f"{where}: {kind} does not fit this server's slots of rank {self.rank_cap} "
                f"(--max-map-rank / {MAX_MAP_RANK_ENV}); start it with --max-map-rank "
                f"{'full' if compact.form == 'full' else compact.rank}, or refit the map with `align fit --rank N`")

    def views(self, maps: dict[str, CompactMap], pinned: set[str]) -> dict[str, MapView]:
        """Slots for the versions one step uses, copying in those not resident and evicting the least
        recently used versions this step does not use (never a pinned one). Versions past the slots
        this leaves are served from their host copy (counted in `overflows`)."""
        needed = [version for version, compact in maps.items() if compact.down is not None]
        for version in needed:
            if version in self.slot_of:
                self.slot_of.move_to_end(version)
        views = {version: _host_view(compact, self.device) for version, compact in maps.items()
                 if compact.down is None}  # shift maps: a bias, no slot
        for version in needed:
            slot = self.slot_of.get(version)
            if slot is None:
                slot = self._free_slot(keep=set(needed) | pinned)
                if slot is None:
                    self.overflows += 1
                    views[version] = _host_view(maps[version], self.device)
                    continue
                self.place(version, maps[version], slot)
            views[version] = self._slot_view(slot, maps[version])
        return views

    def place(self, version: str, compact: CompactMap, slot: int) -> None:
        """Copy a host map into a slot, zero-padded to the slot's rank."""
        layers = torch.tensor(compact.layers, device=self.device)
        for buffer in (self.down, self.up, self.bias, self.layer_mask):
            if buffer is not None:
                buffer[slot].zero_()
        if compact.up is not None and self.up is None:  # a low-rank map in a full bank: its product, D^T
            self.down[slot, layers] = torch.bmm(compact.down.float(), compact.up.float()).to(self.device, self.dtype)
        else:
            self.down[slot, layers, :, :compact.rank] = compact.down.to(self.device, non_blocking=True)
        if compact.up is not None and self.up is not None:
            self.up[slot, layers, :compact.rank] = compact.up.to(self.device, non_blocking=True)
        self.bias[slot, layers] = compact.bias.to(self.device, non_blocking=True)
        self.layer_mask[slot, layers] = True
        self.slot_of[version] = slot
        self.swaps_in += 1

    def pin(self, version: str, compact: CompactMap, pinned: set[str]) -> None:
        """Make a pinned version resident now (it is then never evicted)."""
        if compact.down is not None and version not in self.slot_of:
            slot = self._free_slot(keep=pinned | {version})
            if slot is None:
                raise CapacityError(f"no device slot left to pin {version}: every one of the "
                                    f"{self.config.max_languages} slots is pinned (--max-languages)")
            self.place(version, compact, slot)

    def drop(self, versions: set[str]) -> None:
        """Forget versions released from the host (their slots become free)."""
        for version in versions & set(self.slot_of):
            del self.slot_of[version]

    def _free_slot(self, keep: set[str]) -> int | None:
        used = set(self.slot_of.values())
        free = [slot for slot in range(1, self.config.max_languages + 1) if slot not in used]
        if free:
            return free[0]
        for version, slot in self.slot_of.items():  # least recently used first
            if version not in keep:
                del self.slot_of[version]
                self.evictions += 1
                return slot
        return None

    def _slot_view(self, slot: int, compact: CompactMap) -> MapView:
        # A full bank holds D^T whatever the form; in a low-rank bank only the map's own rank is
        # multiplied (the padding past it is zeros).
        rank = self.rank_cap if self.up is None else compact.rank
        return MapView(
            down=self.down[slot, :, :, :rank],
            up=None if self.up is None or compact.up is None else self.up[slot, :, :rank],
            bias=self.bias[slot],
            index={layer: layer for layer in compact.layers},
        )


def _host_view(compact: CompactMap, device: torch.device) -> MapView:
    def moved(tensor):
        return None if tensor is None else tensor.to(device, non_blocking=True)

    return MapView(moved(compact.down), moved(compact.up), moved(compact.bias),
                   {layer: i for i, layer in enumerate(compact.layers)})
