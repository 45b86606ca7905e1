"""The plugin's state inside one vLLM worker: the model's layers, the store, the step plan.

A request's arguments are parsed, and its intervention version looked up, once: when
the worker first schedules it. The result is kept by request id until vLLM's runner
drops the request's state (`GPUModelRunner._on_request_state_removed`, patched in
plugin.py), so a step costs a dictionary lookup per scheduled request.
"""

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignment.artifact import discover_interventions, find_artifact_dirs
from intervene_engine.bank import BankConfig, DeviceBank
from intervene_engine.request_spec import InterventionRequest, RequestSpecError, parse_request_args, resolve
from intervene_engine.step_plan import ScheduledRequest, StepBuffers, StepPlan, build_step_plan
from intervene_engine.store import InterventionStore, LoadedIntervention, read_intervention
from lingosteer.fingerprint import model_fingerprint

logger = logging.getLogger("lingosteer.plugin")

# vLLM model classes (the class vLLM instantiates, not the checkpoint's `architectures` entry) whose
# `model.layers[start_layer:end_layer]` return (hidden_states, residual) with the stream = hidden_states +
# residual, which the next layer's (or the final norm's) fused add+norm takes as its input; in each, that
# stream after layer i is what the HF decoder layer i returns (alignment.hf_steering hooks it). Gemma 2 / 3
# norm the attention and MLP outputs before adding them, inside the layer: the stream is unchanged.
# tests/test_architectures.py checks every one against plain vLLM and the HF reference.
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
    "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM",
)

# Artifact directories to load when the engine starts (for `vllm serve` users):
# comma-separated; each is one artifact or a folder of artifacts.
PRELOAD_ENV = "LINGOSTEER_INTERVENTIONS"


class UnsupportedArchitectureError(ValueError):
    """The engine's model is not one lingosteer can steer: the engine stops at start (`attach_to_model`)."""


@dataclass(frozen=True)
class WorkerRequest:
    """What the worker needs of one request for its whole life."""

    spec: InterventionRequest | None = None  # resolved against the intervention's serving defaults
    intervention: LoadedIntervention | None = None  # None: the request runs plain
    score_from: int | None = None  # see request_spec.SCORE_FROM_KEY
    # 1 when the prompt starts with BOS, which no position mode steers (request_spec.POSITION_MODES):
    # the maps are fitted on sentence tokens, never on BOS, and calibration never steers it either.
    first_steerable: int = 0


@dataclass
class WorkerState:
    architecture: str
    model_dir: str
    num_layers: int
    device: torch.device
    max_rows: int  # rows in one step at most (vLLM's max_num_batched_tokens)
    hidden_size: int
    dtype: torch.dtype = torch.float32  # the engine's: the bank's and every host map's
    bos_token_id: int | None = None  # the model config's; a leading BOS is never steered
    bank_config: BankConfig = field(default_factory=BankConfig)
    store: InterventionStore = field(default_factory=InterventionStore)
    requests: dict[str, WorkerRequest] = field(default_factory=dict)  # by request id, until it finishes
    _fingerprint: dict | None = None
    _warned_languages: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.buffers = StepBuffers(self.max_rows, self.num_layers, self.device)
        # Allocated here, once: at attach time, before vLLM profiles memory and sizes its KV cache.
        self.bank = DeviceBank(self.bank_config, self.num_layers, self.hidden_size, self.dtype, self.device)
        self.store.max_cpu_languages = self.bank_config.max_cpu_languages
        self.store.max_pins = self.bank_config.max_languages - 1

    @property
    def fingerprint(self) -> dict:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model_dir)
        return self._fingerprint

    def load(self, path: str | Path, pin: bool = False) -> dict:
        intervention = self._read(path)
        self.bank.check_fits(intervention.compact, str(path))
        self.store.install(intervention, pin=pin)
        if intervention.language in self.store.pinned:
            self.bank.pin(intervention.version, intervention.compact, self.store.pinned_versions())
        self.bank.drop(self.store.trim(self._versions_in_use()))
        logger.info("loaded intervention %s version %s from %s", intervention.language, intervention.version, path)
        return {**intervention.describe(), "pinned": intervention.language in self.store.pinned}

    def release_unused(self, versions_in_use: set[str]) -> None:
        self.bank.drop(self.store.release_unused(versions_in_use))

    def _read(self, path: str | Path) -> LoadedIntervention:
        return read_intervention(path, self.fingerprint, self.num_layers, self.dtype)

    def _versions_in_use(self) -> set[str]:
        return {request.intervention.version for request in self.requests.values() if request.intervention}

    def bank_status(self) -> dict:
        return {
            "max_languages": self.bank_config.max_languages,
            "max_cpu_languages": self.bank_config.max_cpu_languages,
            "max_map_rank": self.bank_config.max_map_rank or "full",
            "graph_safe": self.bank_config.graph_safe,
            "bank_bytes": self.bank.memory_bytes,
            "resident": sorted(self.bank.slot_of),
            "on_host": [version for version, i in self.store.versions.items() if i.compact is not None],
            "evictions": self.bank.evictions,
            "swaps_in": self.bank.swaps_in,
            "overflows": self.bank.overflows,
            "loads_on_demand": self.store.loads_on_demand,
        }

    def plan_step(self, runner) -> StepPlan | None:
        """The rows to steer in the step the runner is about to run (None: nothing to do)."""
        if not self.store.versions:
            return None
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        query_start = runner.query_start_loc.np
        scheduled = []
        for i, req_id in enumerate(batch.req_ids[:num_reqs]):
            state = runner.requests[req_id]
            request = self.request(req_id, state)
            if request.intervention is None:
                continue
            try:
                intervention = self.store.hold(request.intervention.version, self._read)
            except (ValueError, OSError) as error:  # its artifact changed or went away: never crash a step
                logger.error("request %s runs plain: cannot read its intervention again: %s", req_id, error)
                continue
            scheduled.append(
                ScheduledRequest(
                    first_row=int(query_start[i]),
                    num_rows=int(query_start[i + 1] - query_start[i]),
                    num_computed=int(batch.num_computed_tokens_cpu[i]),
                    prompt_len=state.num_prompt_tokens,
                    first_steerable=request.first_steerable,
                    spec=request.spec,
                    intervention=intervention,
                )
            )
        if self.store.over_host_capacity:
            # Maps read again from disk, or kept past the cap while a wide batch used them: release the
            # least recently used ones no running request holds (once per step: a length check when within).
            self.bank.drop(self.store.trim(self._versions_in_use()))
        if not scheduled:
            return None
        return build_step_plan(scheduled, self.buffers, self.bank, frozenset(self.store.pinned_versions()),
                               self.bank_config.graph_safe)

    def request(self, req_id: str, state) -> WorkerRequest:
        """The request's arguments and intervention (`state`: vLLM's CachedRequestState), resolved when
        first seen and kept until `forget`."""
        request = self.requests.get(req_id)
        if request is None:
            request = self.requests[req_id] = self._resolve(req_id, state.sampling_params, state.prompt_token_ids)
        return request

    def forget(self, req_id: str) -> None:
        """The request finished (or was aborted): vLLM's runner dropped its state."""
        self.requests.pop(req_id, None)

    def _resolve(self, req_id: str, sampling_params, prompt_token_ids) -> WorkerRequest:
        try:
            args = parse_request_args(sampling_params.extra_args if sampling_params is not None else None)
        except RequestSpecError as error:  # validated in the front end; never crash a step
            logger.warning("request %s: ignoring malformed intervention: %s", req_id, error)
            return WorkerRequest()
        spec = args.intervention
        if spec is None:
            return WorkerRequest(score_from=args.score_from)
        # The engine core binds every request whose language is loaded when it arrives; one
        # that arrived unbound runs plain even if its language is loaded later (its KV blocks
        # were hashed as plain).
        intervention = self.store.get(spec.version) if spec.version else None
        if intervention is None and spec.language not in self._warned_languages:
            self._warned_languages.add(spec.language)
            logger.warning("no intervention loaded for %r; request runs plain", spec.language)
        if intervention is not None:  # what the request left out: the bound version's serving defaults
            spec = resolve(spec, intervention.serving, intervention.layers)
        starts_with_bos = bool(prompt_token_ids) and prompt_token_ids[0] == self.bos_token_id
        return WorkerRequest(spec, intervention, args.score_from, first_steerable=int(starts_with_bos))


def decoder_layers(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    inner = model.model
    return [(i, inner.layers[i]) for i in range(inner.start_layer, inner.end_layer)]


def attach_to_model(model: torch.nn.Module, model_dir: str, device: torch.device, max_rows: int, hidden_size: int,
                    dtype: torch.dtype, bos_token_id: int | None = None) -> WorkerState:
    """Route every decoder layer's output through the steering op (before compilation), and allocate the bank
    (`BankConfig.from_env`)."""
    architecture = type(model).__name__
    if architecture not in SUPPORTED_ARCHITECTURES:
        # Stop rather than serve plain: requests that ask for a language would be answered unsteered in silence.
        raise UnsupportedArchitectureError(
            f"lingosteer cannot steer {architecture} (the vLLM model class of {model_dir}); supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}; start vLLM with VLLM_PLUGINS='' to serve it without lingosteer"
        )
    state = WorkerState(architecture, model_dir, len(model.model.layers), device, max_rows, hidden_size, dtype,
                        bos_token_id=bos_token_id, bank_config=BankConfig.from_env())
    for index, layer in decoder_layers(model):
        _route_through_op(layer, index)
    for path in _preload_paths(state):
        state.load(path)
    return state


def _route_through_op(layer: torch.nn.Module, index: int) -> None:
    forward = layer.forward

    def steered_forward(*args, **kwargs):
        hidden_states, residual = forward(*args, **kwargs)
        torch.ops.lingosteer.steer_residual(hidden_states, residual, index)
        return hidden_states, residual

    layer.forward = steered_forward


def _preload_paths(state: WorkerState) -> list[Path]:
    """The artifacts `PRELOAD_ENV` names for this model: each entry is an artifact or a folder of them."""

    value = os.environ.get(PRELOAD_ENV, "")
    if not value:
        return []
    entries = value.split(",")
    if not all(entry.strip() for entry in entries):
        # "a,,b" or "a," is most likely a mistyped list; guessing what was meant could load the wrong thing.
        raise ValueError(f"{PRELOAD_ENV}={value!r} has an empty entry: give comma-separated artifact directories")
    chosen: dict[str, Path] = {}
    for entry in entries:
        found = discover_interventions(entry, fingerprint=state.fingerprint)
        if not found:
            others = len(find_artifact_dirs(entry))  # what discovery skipped: artifacts of other models
            raise FileNotFoundError(f"{PRELOAD_ENV}: no intervention artifacts for this model under {entry}"
                                    + (f" ({others} fitted on another model)" if others else ""))
        for language, path in found.items():
            if language in chosen:
                raise ValueError(f"{PRELOAD_ENV}: two interventions for {language}: {chosen[language]} and {path}")
            chosen[language] = path
    return list(chosen.values())
