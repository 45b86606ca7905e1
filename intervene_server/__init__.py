"""The lingosteer HTTP server: vLLM's OpenAI-compatible app plus language routing,
the interventions ops API, interference data and metrics (see docs/server.md).
The engine side of steering is `intervene_engine`; this package holds only HTTP."""
