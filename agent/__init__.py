"""Local agent: config, canonical models, local API, relay wiring, CLI and demo."""
