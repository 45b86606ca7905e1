"""The maps a worker can steer with at once: a bounded bank of device slots sized at start.

Like vLLM's multi-LoRA serving (`max_loras` device slots, a `max_cpu_loras` host cache,
LRU eviction, pinning), the worker holds every loaded version's map on the host in the form
it was stored (`CompactMap`), and copies the maps a step needs into preallocated device
slots. The bank's buffers are allocated once, when the worker attaches (after the weights
load, before vLLM profiles memory and sizes the KV cache, so on a GPU they are counted in
that profile and a load later can never take memory the KV cache was given). With S slots
of rank R (R = d in a full bank), in the engine's dtype:

    down [L, d, S R]    slot s's D^T (full maps) or V^T (low-rank maps, zero-padded to R)
                        in columns (s - 1) R ... s R - 1
    up   [L, S R, d]    slot s's U^T in rows (s - 1) R ... s R - 1; absent in a full bank
    bias [L, S + 1, d]  row 0: the no-op slot (zeros), which unsteered rows point at

Layer-major, so one layer's slots are one matrix: the steering op (`residual_op`) multiplies
every row of a step by all of them at once and keeps, per row, its own slot's columns. That
costs S R (2 d) per row and layer whoever is steered, and launches the same kernels on the same
shapes whichever rows, languages, alphas and layers a step steers: what a captured CUDA graph
needs. A slot holding a shift-only map has zero matrices; a step whose steered rows all use
shift maps skips the matmuls (decided on the host, like vLLM's separate LoRA / no-LoRA graphs).
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
# "1": steer every step by the op's graph-safe path (`residual_op.steer_rows`), which a captured CUDA graph
# needs, also where none is captured: to test it in a real engine and to measure what it costs.
GRAPH_SAFE_ENV = "LINGOSTEER_GRAPH_SAFE"
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
    graph_safe: bool = False  # GRAPH_SAFE_ENV

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
            graph_safe=os.environ.get(GRAPH_SAFE_ENV, "0") == "1",
        )

    def env(self) -> dict[str, str]:
        """The environment that makes `from_env` return this configuration in vLLM's worker."""
        return {
            MAX_LANGUAGES_ENV: str(self.max_languages),
            MAX_CPU_LANGUAGES_ENV: str(self.max_cpu_languages),
            MAX_MAP_RANK_ENV: "full" if self.max_map_rank is None else str(self.max_map_rank),
        } | ({GRAPH_SAFE_ENV: "1"} if self.graph_safe else {})


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


class DeviceBank:
    """The preallocated slots and which version each holds, least recently used first."""

    def __init__(self, config: BankConfig, num_layers: int, hidden_size: int, dtype: torch.dtype,
                 device: torch.device):
        self.config = config
        self.hidden_size = hidden_size
        slots = config.max_languages
        self.rank_cap = hidden_size if config.max_map_rank is None else config.max_map_rank
        self.down = torch.zeros(num_layers, hidden_size, slots * self.rank_cap, dtype=dtype, device=device)
        self.up = None if config.max_map_rank is None else torch.zeros(
            num_layers, slots * self.rank_cap, hidden_size, dtype=dtype, device=device)
        self.bias = torch.zeros(num_layers, slots + 1, hidden_size, dtype=dtype, device=device)
        self.slot_ids = torch.arange(1, slots + 1, device=device)  # the op compares each row's slot with these
        self.device = device
        self.slot_of: OrderedDict[str, int] = OrderedDict()  # version -> slot, least recently used first
        self.rank_of = [0] * (slots + 1)  # by slot: the columns its map uses (0: a shift map, and slot 0)
        self.evictions = 0
        self.swaps_in = 0  # copies of a host map into a slot
        self.overflows = 0  # versions a step served from a bank of its own because every slot was needed

    @property
    def dtype(self) -> torch.dtype:
        return self.bias.dtype

    @property
    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.down, self.up, self.bias) if t is not None)

    @property
    def has_matrix(self) -> list[bool]:
        """By slot: whether its map multiplies (False for a shift map, and slot 0)."""
        return [rank > 0 for rank in self.rank_of]

    def check_fits(self, compact: CompactMap, where: str) -> None:
        """Refuse a map no slot can hold, naming the cap and how to raise it."""
        if compact.rank > self.rank_cap:
            kind = "a full d x d map" if compact.form == "full" else f"a rank-{compact.rank} map"
            raise CapacityError(
                f"{where}: {kind} does not fit this server's slots of rank {self.rank_cap} "
                f"(--max-map-rank / {MAX_MAP_RANK_ENV}); start it with --max-map-rank "
                f"{'full' if compact.form == 'full' else compact.rank}, or refit the map with `align fit --rank N`")

    def assign(self, maps: dict[str, CompactMap], pinned: set[str]) -> tuple[dict[str, int], dict[str, CompactMap]]:
        """Slots for the versions one step uses, copying in those not resident and evicting the least
        recently used versions this step does not use (never a pinned one). Returns the slot of each
        version that got one, and the versions left over when the step needs more than there are slots
        (counted in `overflows`; `overflow_bank` serves them)."""
        for version in maps:
            if version in self.slot_of:
                self.slot_of.move_to_end(version)
        slots, left_over = {}, {}
        for version, compact in maps.items():
            slot = self.slot_of.get(version)
            if slot is None:
                slot = self._free_slot(keep=set(maps) | pinned)
                if slot is None:
                    self.overflows += 1
                    left_over[version] = compact
                    continue
                self.place(version, compact, slot)
            slots[version] = slot
        return slots, left_over

    def overflow_bank(self, maps: dict[str, CompactMap]) -> tuple["DeviceBank", dict[str, int]]:
        """A bank of this one's rank allocated for one step, holding `maps` (the versions `assign` left over).
        Not graph safe, and it copies the maps every step: only a step that mixes more languages than
        --max-languages takes this path."""
        config = BankConfig(len(maps), len(maps), self.config.max_map_rank)
        bank = DeviceBank(config, self.bias.shape[0], self.hidden_size, self.dtype, self.device)
        for slot, (version, compact) in enumerate(maps.items(), start=1):
            bank.place(version, compact, slot)
        return bank, dict(bank.slot_of)

    def place(self, version: str, compact: CompactMap, slot: int) -> None:
        """Copy a host map into a slot, zero-padded to the slot's rank."""
        layers = torch.tensor(compact.layers, device=self.device)
        cols = slice((slot - 1) * self.rank_cap, slot * self.rank_cap)
        self.down[:, :, cols].zero_()
        self.bias[:, slot].zero_()
        if self.up is not None:
            self.up[:, cols].zero_()
        if compact.down is not None:
            if compact.up is not None and self.up is None:  # a low-rank map in a full bank: its product, D^T
                down = torch.bmm(compact.down.float(), compact.up.float())
            else:
                down = compact.down
            self.down[layers, :, cols.start:cols.start + down.shape[2]] = down.to(self.device, self.dtype)
            if compact.up is not None and self.up is not None:
                self.up[layers, cols.start:cols.start + compact.rank] = compact.up.to(self.device, self.dtype)
        self.bias[layers, slot] = compact.bias.to(self.device, self.dtype)
        self.rank_of[slot] = 0 if compact.down is None else (self.rank_cap if self.up is None else compact.rank)
        self.slot_of[version] = slot
        self.swaps_in += 1

    def pin(self, version: str, compact: CompactMap, pinned: set[str]) -> None:
        """Make a pinned version resident now (it is then never evicted)."""
        if version not in self.slot_of:
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
