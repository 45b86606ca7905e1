"""The vLLM engine plugin: per-request steering inside the engine (worker, engine core and
front-end patches, the loaded interventions, the steering op). Both the HTTP server
(`intervene_server`) and the offline benchmark (`evaluation`) run engines with it."""
