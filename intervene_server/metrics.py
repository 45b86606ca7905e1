"""Prometheus metrics, in the default registry that vLLM's /metrics already serves."""

from prometheus_client import Counter, Gauge

REQUESTS = Counter(
    "lingosteer_requests",
    "Completion and chat requests by the intervention applied (language 'none': plain).",
    ["endpoint", "language", "version", "source"],
)
DETECTIONS = Counter(
    "lingosteer_language_detections",
    "Outcomes of automatic language identification (auto and auto-spans).",
    ["outcome"],  # steered | low_confidence | no_intervention | no_text
)
ROUTING_ERRORS = Counter(
    "lingosteer_routing_errors", "Requests refused with 400 by language routing.", ["endpoint"]
)
INTERVENTION_EVENTS = Counter(
    "lingosteer_intervention_events",
    "Loads, swaps and unloads of interventions, and refused loads.",
    ["event", "language"],  # event: load | swap | unload | rejected | first_use (a rollback is a swap)
)
# The worker's bank (intervene_engine.bank), read from `lingosteer_status` every BANK_POLL_SECONDS:
# the worker counts, these mirror its counts (so they are gauges, not counters).
BANK_POLL_SECONDS = 10.0
BANK = {
    "resident": Gauge("lingosteer_bank_resident_languages", "Versions held in a device slot now."),
    "bank_bytes": Gauge("lingosteer_bank_bytes", "Bytes of the device bank, allocated once at start."),
    "evictions": Gauge("lingosteer_bank_evictions", "Versions evicted from a device slot since start."),
    "loads_on_demand": Gauge("lingosteer_bank_loads_on_demand",
                             "Maps read again from disk because a request needed them, since start."),
    "overflows": Gauge("lingosteer_bank_overflows",
                       "Versions a step served from the host copy because every slot was needed, since start."),
}


def set_bank(status: dict) -> None:
    for key, gauge in BANK.items():
        value = status[key]
        gauge.set(len(value) if key == "resident" else value)


def count_request(endpoint: str, applied) -> None:
    REQUESTS.labels(
        endpoint=endpoint,
        language=applied.language if applied.applied else "none",
        version=applied.version or "none",
        source=applied.source,
    ).inc()
