"""Prefill -> decode KV handoff: the engine's KV connector and the transfer stream format."""
