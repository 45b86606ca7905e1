"""Several workers: tensor (and pipeline) parallel engines steer like one worker, and every load reaches, and is
checked on, every worker.

The real engines (tiny Llama, fp32) run once for the module, one after another: TP=2 (eager), PP=2 (compiled:
vLLM 0.32 cannot run pipeline parallelism eagerly on CPU) and TP=1, through `plugin_support.
check_tensor_parallel_on_model`, which bench/tensor_parallel.py reports. A worker-specific failure cannot
happen on one machine's filesystem, so the rollback of a load the workers disagree on runs the engine core's
wrapper (`plugin.follow_loads`) over two real worker stores behind a fake `collective_rpc`.
"""

from types import SimpleNamespace

import pytest
import torch

from intervene_engine import worker_rpc
from intervene_engine.plugin import follow_loads
from intervene_engine.worker_rpc import ERROR_KEY, WorkerRpcError, WorkersDisagreeError, agreed_answer
from intervene_engine.worker_state import WorkerState
from lingosteer.fingerprint import model_fingerprint
from plugin_support import TP_SIZE, check_tensor_parallel_on_model, write_planted_intervention

NOWHERE = "/nonexistent/on/this/worker"


@pytest.fixture(scope="module")
def parallel(model_dir, tmp_path_factory):
    from lingosteer.backend import is_cpu_backend

    if not is_cpu_backend() and torch.cuda.device_count() < TP_SIZE:
        pytest.skip(f"{TP_SIZE} workers need {TP_SIZE} GPUs")
    return check_tensor_parallel_on_model(model_dir, tmp_path_factory.mktemp("parallel"), pipeline=True)


def test_tensor_parallel_steers_like_one_worker(parallel):
    assert parallel["size"] == TP_SIZE
    assert parallel["tokens_identical"]
    assert parallel["max_abs_diff_tp1"] <= parallel["tolerance"]
    assert parallel["steering_effect"] > 1e-2  # the planted maps moved the logprobs: the comparison is not vacuous


def test_pipeline_parallel_stages_steer_like_one_worker(parallel):
    pipeline = parallel["pipeline"]
    assert pipeline["tokens_identical"] and pipeline["max_abs_diff_tp1"] <= parallel["tolerance"]
    [version] = set(parallel["ranks"]["loaded"][0]["current"].values())
    assert pipeline["loaded"] == [{"swh_Latn": version}] * TP_SIZE  # the same artifact, on both stages


def test_loads_swaps_and_unloads_reach_every_rank(parallel):
    ranks = parallel["ranks"]
    for state in ("loaded", "swapped", "after_refused", "unloaded"):
        assert len(ranks[state]) == TP_SIZE and all(rank == ranks[state][0] for rank in ranks[state]), state
    [first] = ranks["loaded"][0]["versions_held"]
    [second] = set(ranks["swap_answers"])
    assert len(ranks["swap_answers"]) == TP_SIZE and second != first
    assert ranks["loaded"][0]["current"] == {"swh_Latn": first}
    assert ranks["swapped"][0] == {"current": {"swh_Latn": second}, "versions_held": [second]}  # first released
    assert ranks["unload_answers"] == [second] * TP_SIZE
    assert ranks["unloaded"][0] == {"current": {}, "versions_held": []}


def test_a_refused_load_keeps_every_rank_and_their_answers_in_step(parallel):
    """Every rank refused the load: the engine raises the workers' error, and each rank's next answer is its own
    (vLLM's executor stops reading at the first worker that raised, so a raising worker method would leave the
    other ranks' answers behind for the next call)."""
    ranks = parallel["ranks"]
    assert "missing is not an intervention directory" in ranks["refused_error"]
    assert "disagree" not in ranks["refused_error"]
    assert ranks["after_refused"] == ranks["swapped"]


# ---- workers that disagree (the engine core's wrapper over two real worker stores) -----------------------------


class TwoWorkers:
    """An engine core (what `follow_loads` reads of it) over two workers with real stores, where `views[rank]`
    maps a path to the one that worker reads instead (its filesystem holds something else there)."""

    def __init__(self, model_dir):
        fingerprint = model_fingerprint(model_dir)
        self.workers = [SimpleNamespace(model_runner=SimpleNamespace(lingosteer_state=WorkerState(
            "LlamaForCausalLM", str(model_dir), fingerprint["num_hidden_layers"], torch.device("cpu"), max_rows=64,
            hidden_size=fingerprint["hidden_size"]))) for _ in range(2)]
        self.views: list[dict[str, str]] = [{}, {}]
        self.calls: list[str] = []
        # What _engine_directory requires of an engine core; no prefix caching, no requests.
        self.scheduler = SimpleNamespace(requests={})
        self.request_block_hasher = None
        self.vllm_config = None

    def send(self, method, timeout=None, args=(), kwargs=None) -> list:
        """vLLM's collective_rpc: the method on every worker, one answer each."""
        self.calls.append(method)
        answers = []
        for rank, worker in enumerate(self.workers):
            worker_args = tuple(self.views[rank].get(arg, arg) if isinstance(arg, str) else arg for arg in args)
            answers.append(getattr(worker_rpc, method)(worker, *worker_args, **(kwargs or {})))
        return answers

    collective_rpc = follow_loads(send)

    def store(self, rank: int):
        return self.workers[rank].model_runner.lingosteer_state.store

    def held(self) -> list[tuple[dict, set, set]]:
        return [(dict(self.store(rank).current), set(self.store(rank).versions), set(self.store(rank).pinned))
                for rank in range(2)]


@pytest.fixture()
def artifacts(model_dir, tmp_path):
    return {name: write_planted_intervention(tmp_path / name, model_dir, [0, 1], language, seed=seed)
            for name, language, seed in (("swh", "swh_Latn", 1), ("swh_v2", "swh_Latn", 2), ("swh_v3", "swh_Latn", 3),
                                         ("ita", "ita_Latn", 4))}


@pytest.fixture()
def engine(model_dir, artifacts):
    engine = TwoWorkers(model_dir)
    [first, _] = engine.collective_rpc("lingosteer_load", args=(str(artifacts["swh"]),))
    engine.first = first["version"]
    return engine


def test_a_load_every_worker_makes_is_followed(engine, artifacts):
    answers = engine.collective_rpc("lingosteer_load", args=(str(artifacts["swh_v2"]),), kwargs={"pin": True})
    [version] = {answer["version"] for answer in answers}
    assert engine.lingosteer_directory.versions == {"swh_Latn": version}
    assert engine.held() == [({"swh_Latn": version}, {version}, {"swh_Latn"})] * 2  # the first version released


@pytest.mark.parametrize("fault", ["other_version", "missing"])
def test_a_load_the_workers_disagree_on_is_rolled_back_on_every_worker(engine, artifacts, fault):
    """Rank 1's filesystem holds another artifact at the path (another version), or nothing: the version rank 0
    loaded is undone, the earlier one keeps serving everywhere, and the error says what each rank answered."""
    before = engine.held()
    engine.views[1] = {str(artifacts["swh_v2"]): NOWHERE if fault == "missing" else str(artifacts["swh_v3"])}
    with pytest.raises(WorkersDisagreeError) as error:
        engine.collective_rpc("lingosteer_load", args=(str(artifacts["swh_v2"]),), kwargs={"pin": True})
    message = str(error.value)
    assert message.startswith("the 2 workers disagree on lingosteer_load: rank 0 loaded swh_Latn version ")
    assert (f"rank 1 failed: {NOWHERE}" if fault == "missing" else "rank 1 loaded swh_Latn version") in message
    assert message.endswith(f"rolled back on every worker: swh_Latn keeps version {engine.first}")
    assert engine.held() == before  # the refused versions released, the pin the refused load added undone
    assert engine.lingosteer_directory.versions == {"swh_Latn": engine.first}
    assert engine.calls[-2:] == ["lingosteer_restore", "lingosteer_release_unused"]


def test_a_new_language_one_worker_could_not_load_is_unloaded_again(engine, artifacts):
    engine.views[1] = {str(artifacts["ita"]): NOWHERE}
    with pytest.raises(WorkersDisagreeError, match="rolled back on every worker: ita_Latn stays unloaded$"):
        engine.collective_rpc("lingosteer_load", args=(str(artifacts["ita"]),))
    assert [current for current, _, _ in engine.held()] == [{"swh_Latn": engine.first}] * 2


def test_an_unload_one_worker_failed_is_undone(engine, monkeypatch):
    def fail(language):
        raise OSError("disk gone")

    monkeypatch.setattr(engine.store(1), "remove", fail)
    with pytest.raises(WorkersDisagreeError, match=r"rank 0 unloaded version \w+; rank 1 failed: disk gone; rolled "
                       rf"back on every worker: swh_Latn keeps version {engine.first}$"):
        engine.collective_rpc("lingosteer_unload", args=("swh_Latn",))
    assert engine.store(0).current == {"swh_Latn": engine.first}
    assert engine.lingosteer_directory.versions == {"swh_Latn": engine.first}


def test_a_load_every_worker_refused_changes_nothing_and_raises_their_error(engine, artifacts, tmp_path):
    before = engine.held()
    with pytest.raises(WorkerRpcError) as error:
        engine.collective_rpc("lingosteer_load", args=(str(tmp_path / "missing"),))
    assert type(error.value) is WorkerRpcError and str(error.value).endswith("missing is not an intervention directory")
    assert engine.held() == before and "lingosteer_restore" not in engine.calls


def test_agreed_answer_of_lists_and_of_workers_that_all_failed():
    entry = {"language": "swh_Latn", "version": "a", "pinned": False}
    assert agreed_answer("lingosteer_list", [[entry], [entry]]) == [entry]
    with pytest.raises(WorkersDisagreeError, match=r"disagree on lingosteer_list: rank 0 answered \[\('swh_Latn', "):
        agreed_answer("lingosteer_list", [[entry], []])
    with pytest.raises(WorkerRpcError, match=r"^rank 0: full; rank 1: gone$"):
        agreed_answer("lingosteer_unload", [{ERROR_KEY: "full"}, {ERROR_KEY: "gone"}])
