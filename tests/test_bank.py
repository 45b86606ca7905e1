"""The bank of device slots and the host cache: forms served as stored, LRU, pins, capacity refusals."""

import numpy as np
import pytest
import torch

from alignment.artifact import ServingDefaults, load_intervention, save_intervention
from alignment.estimator import LinearAligner
from intervene_engine.bank import BankConfig, CapacityError, CompactMap, DeviceBank
from intervene_engine.request_spec import InterventionRequest, resolve
from intervene_engine.step_plan import ScheduledRequest, StepBuffers, build_step_plan
from intervene_engine.store import InterventionStore, LoadedIntervention, read_intervention

DIM, LAYERS = 16, (0, 2)
FINGERPRINT = {"architecture": "LlamaForCausalLM", "hidden_size": DIM, "num_hidden_layers": 3}


def _artifact(tmp_path, solver: str, rank: int | None = None, source="swh_Latn", seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((len(LAYERS), 200, DIM))
    Y = X @ (np.eye(DIM) + 0.3 * rng.standard_normal((DIM, DIM))) + rng.standard_normal(DIM)
    aligner = LinearAligner(solver=solver, bias=True, rank=rank).fit(X, Y)
    return save_intervention(tmp_path / f"{source}-{solver}-{rank}-{seed}", aligner, fingerprint=FINGERPRINT,
                             source=source, target="eng_Latn", layers=list(LAYERS), pooling="mean",
                             fit_data={}, alpha=1.0, overwrite=True)


def _bank(max_languages=2, max_map_rank=8, dtype=torch.float32):
    config = BankConfig(max_languages=max_languages, max_cpu_languages=max(max_languages, 2),
                        max_map_rank=max_map_rank)
    return DeviceBank(config, 3, DIM, dtype, torch.device("cpu"))


def _steer(intervention: LoadedIntervention, bank: DeviceBank, stream: torch.Tensor, alpha=0.7,
           graph_safe=False) -> torch.Tensor:
    """Run the op on `stream` (as the residual, hidden 0) at layer 2 for every row; return the new stream."""
    from intervene_engine.residual_op import active_plan

    spec = resolve(InterventionRequest("swh_Latn", alpha=alpha, positions="all", version=intervention.version),
                   intervention.serving, intervention.layers)
    request = ScheduledRequest(0, stream.shape[0], 0, stream.shape[0], 0, spec, intervention)
    plan = build_step_plan([request], StepBuffers(16, 3, torch.device("cpu")), bank, graph_safe=graph_safe)
    hidden, residual = torch.zeros_like(stream), stream.clone()
    with active_plan(plan):
        torch.ops.lingosteer.steer_residual(hidden, residual, 2)
    return residual


@pytest.mark.parametrize("graph_safe", [False, True], ids=["eager", "graph-safe"])
@pytest.mark.parametrize("solver, rank", [("lstsq", None), ("lstsq", 4), ("meanshift", None)])
def test_each_form_is_served_as_stored_and_equals_the_dense_formula(tmp_path, solver, rank, graph_safe):
    path = _artifact(tmp_path, solver, rank)
    intervention = read_intervention(path, FINGERPRINT, 3, torch.float32)
    compact = intervention.compact
    assert compact.form == {None: "full", 4: "lowrank"}.get(rank, "full") if solver == "lstsq" else "shift"
    stream = torch.randn(5, DIM)
    expected = load_intervention(path).apply(stream.numpy(), 2, alpha=0.7)
    bank = _bank(max_map_rank=None if rank is None and solver == "lstsq" else 8)
    steered = _steer(intervention, bank, stream, graph_safe=graph_safe)
    assert torch.allclose(steered, torch.from_numpy(expected), atol=1e-5)
    # What is resident is the form as stored: d^2 + d (full), r (2 d) + d (low rank), d (shift) per layer.
    per_layer = {"full": DIM * DIM + DIM, "lowrank": 4 * 2 * DIM + DIM, "shift": DIM}[compact.form]
    assert intervention.memory_bytes == len(LAYERS) * per_layer * 4


def test_maps_are_held_in_the_engine_dtype_and_updated_in_fp32(tmp_path):
    path = _artifact(tmp_path, "lstsq", 4)
    intervention = read_intervention(path, FINGERPRINT, 3, torch.bfloat16)
    assert intervention.compact.down.dtype == torch.bfloat16
    assert intervention.memory_bytes == len(LAYERS) * (4 * 2 * DIM + DIM) * 2
    stream = torch.randn(5, DIM)
    expected = torch.from_numpy(load_intervention(path).apply(stream.numpy(), 2, alpha=0.7))
    steered = _steer(intervention, _bank(dtype=torch.bfloat16), stream)
    assert torch.allclose(steered, expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("graph_safe", [False, True], ids=["eager", "graph-safe"])
def test_a_step_steered_by_shift_maps_only_launches_no_matmul(tmp_path, monkeypatch, graph_safe):
    intervention = read_intervention(_artifact(tmp_path, "meanshift"), FINGERPRINT, 3, torch.float32)
    bank = _bank()
    calls = []
    mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *args: calls.append(args) or mm(*args))
    _steer(intervention, bank, torch.randn(3, DIM), graph_safe=graph_safe)
    assert calls == [] and list(bank.slot_of) == [intervention.version]


def test_eager_steps_multiply_a_low_rank_map_by_its_own_rank_only(tmp_path, monkeypatch):
    intervention = read_intervention(_artifact(tmp_path, "lstsq", 4), FINGERPRINT, 3, torch.float32)
    shapes = []
    mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b: shapes.append(tuple(b.shape)) or mm(a, b))
    _steer(intervention, _bank(max_map_rank=8), torch.randn(3, DIM))
    assert shapes == [(DIM, 4), (4, DIM)]  # r (2 d) per row, not d^2, nor the slot's rank 8, nor other slots


def test_the_op_launches_the_same_gemms_whatever_a_step_steers(tmp_path, monkeypatch):
    """What a captured graph needs: shapes set by the bank and the step's row count, not by who is steered."""
    low = read_intervention(_artifact(tmp_path, "lstsq", 4), FINGERPRINT, 3, torch.float32)
    other = read_intervention(_artifact(tmp_path, "lstsq", 2, seed=1), FINGERPRINT, 3, torch.float32)
    bank = _bank(max_map_rank=8)
    shapes = []
    mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b: shapes.append((tuple(a.shape), tuple(b.shape))) or mm(a, b))
    _steer(low, bank, torch.randn(5, DIM), graph_safe=True)
    first, shapes[:] = list(shapes), []
    _steer(other, bank, torch.randn(5, DIM), alpha=-0.3, graph_safe=True)
    assert shapes == first == [((5, DIM), (DIM, 2 * 8)), ((5, 2 * 8), (2 * 8, DIM))]  # S R = 2 slots x rank 8


def test_a_map_larger_than_a_slot_is_refused_naming_the_cap(tmp_path):
    full = read_intervention(_artifact(tmp_path, "lstsq"), FINGERPRINT, 3, torch.float32)
    with pytest.raises(CapacityError, match="--max-map-rank.*align fit --rank"):
        _bank(max_map_rank=8).check_fits(full.compact, "x")
    _bank(max_map_rank=None).check_fits(full.compact, "x")  # a full bank holds it
    _bank(max_map_rank=DIM).check_fits(full.compact, "x")  # so does a bank of rank d


def test_a_low_rank_map_in_a_full_bank_is_its_product(tmp_path):
    path = _artifact(tmp_path, "lstsq", 4)
    intervention = read_intervention(path, FINGERPRINT, 3, torch.float32)
    stream = torch.randn(5, DIM)
    expected = torch.from_numpy(load_intervention(path).apply(stream.numpy(), 2, alpha=0.7))
    assert torch.allclose(_steer(intervention, _bank(max_map_rank=None), stream), expected, atol=1e-5)


def _version(name: str, rank=2) -> CompactMap:
    return CompactMap("lowrank", LAYERS, torch.randn(len(LAYERS), DIM, rank), torch.randn(len(LAYERS), rank, DIM),
                      torch.randn(len(LAYERS), DIM))


def test_slots_are_reused_least_recently_used_first_never_a_pinned_or_needed_one():
    bank = _bank(max_languages=2)
    maps = {name: _version(name) for name in "abcd"}
    bank.assign({"a": maps["a"]}, set())
    bank.assign({"b": maps["b"]}, set())
    bank.assign({"a": maps["a"]}, set())  # a is now the most recently used
    bank.assign({"c": maps["c"]}, set())
    assert set(bank.slot_of) == {"a", "c"} and bank.evictions == 1
    bank.assign({"d": maps["d"]}, {"a"})  # a pinned: c goes
    assert set(bank.slot_of) == {"a", "d"}
    # A step that needs more versions than slots still runs: the rest are left over for a bank of their own.
    slots, left_over = bank.assign({name: maps[name] for name in "abc"}, set())
    assert set(slots) == {"a", "b"} and set(left_over) == {"c"} and bank.overflows == 1
    columns = slice((slots["a"] - 1) * 8, slots["a"] * 8)  # rank cap 8: slot s owns columns (s-1) 8 ... s 8 - 1
    assert torch.equal(bank.down[list(LAYERS), :, columns][:, :, :2], maps["a"].down)
    assert torch.all(bank.down[:, :, columns][:, :, 2:] == 0)  # padded with zeros past the map's rank
    assert torch.all(bank.down[1, :, columns] == 0)  # a layer the map does not steer
    assert torch.all(bank.bias[:, 0] == 0)  # slot 0: the no-op slot
    extra, extra_slots = bank.overflow_bank(left_over)
    assert extra_slots == {"c": 1} and torch.equal(extra.up[list(LAYERS), :2], maps["c"].up)


def _loaded(version: str, language: str) -> LoadedIntervention:
    compact = _version(version)
    serving = ServingDefaults(alpha=1.0, layers=LAYERS, positions="last")
    return LoadedIntervention(language, "eng_Latn", version, f"/{version}", serving, None, LAYERS, "lowrank",
                              compact.memory_bytes, compact)


def test_the_host_cache_releases_to_disk_least_recently_used_and_reads_again_on_use():
    store = InterventionStore(max_cpu_languages=2)
    for version, language in (("a1", "aaa_Latn"), ("b1", "bbb_Latn"), ("c1", "ccc_Latn")):
        store.install(_loaded(version, language))
    assert store.trim(keep={"a1"}) == {"b1"}  # a1 is in use by a running request
    assert store.get("b1").compact is None and store.get("a1").compact is not None
    reads = []
    again = store.hold("b1", lambda path: reads.append(path) or _loaded("b1", "bbb_Latn"))
    assert reads == ["/b1"] and again.compact is not None and store.loads_on_demand == 1
    assert store.trim(keep=set()) == {"a1"}
    with pytest.raises(ValueError, match="changed on disk"):  # a version is its content: never another one
        store.hold("a1", lambda path: _loaded("other", "aaa_Latn"))


def test_pins_beyond_the_slots_are_refused_and_pinned_maps_stay():
    store = InterventionStore(max_cpu_languages=2, max_pins=1)
    store.install(_loaded("a1", "aaa_Latn"), pin=True)
    with pytest.raises(CapacityError, match="--max-languages"):
        store.install(_loaded("b1", "bbb_Latn"), pin=True)
    store.install(_loaded("b1", "bbb_Latn"))
    store.install(_loaded("c1", "ccc_Latn"))
    assert store.trim(keep=set()) == {"b1"}  # a1 is older but pinned
    store.remove("aaa_Latn")
    assert store.pinned == set()


def test_the_bank_is_sized_once_by_its_configuration(monkeypatch):
    monkeypatch.setenv("LINGOSTEER_MAX_LANGUAGES", "3")
    monkeypatch.setenv("LINGOSTEER_MAX_MAP_RANK", "full")
    config = BankConfig.from_env()
    assert config == BankConfig(max_languages=3, max_map_rank=None) and BankConfig.from_env() == config
    bank = DeviceBank(config, 3, DIM, torch.bfloat16, torch.device("cpu"))
    assert bank.up is None and bank.memory_bytes == 3 * (3 * DIM * DIM + 4 * DIM) * 2  # no-op slot: a bias
    with pytest.raises(ValueError, match="--max-cpu-languages"):
        BankConfig(max_languages=8, max_cpu_languages=4)


def test_serve_options_default_to_the_bank_defaults_and_refuse_pins_beyond_the_slots():
    from lingosteer.entrypoints.serve import bank_config, build_serve_parser

    options = build_serve_parser().parse_args(["model", "--interventions", "dir"])
    assert bank_config(options) == BankConfig()
    pinned = build_serve_parser().parse_args(["m", "--interventions", "d", "--max-languages", "2",
                                              "--pin", "swh_Latn", "--pin", "ita_Latn"])
    with pytest.raises(ValueError, match="at most --max-languages - 1 = 1"):
        bank_config(pinned)
