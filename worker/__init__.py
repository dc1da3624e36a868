"""One worker: the batched inference core (engine/), the model it runs (model/), the
prefill -> decode KV handoff (kv/), the HTTP API (api/) and the metrics all of them report."""
