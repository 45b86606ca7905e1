"""Prometheus metrics, in the default registry that vLLM's /metrics already serves."""

from prometheus_client import Counter

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
    ["event", "language"],  # event: load | swap | unload | rejected
)


def count_request(endpoint: str, applied) -> None:
    REQUESTS.labels(
        endpoint=endpoint,
        language=applied.language if applied.applied else "none",
        version=applied.version or "none",
        source=applied.source,
    ).inc()
