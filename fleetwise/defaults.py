"""The engine's defaults, stated once for every place that has them: the worker's
`EngineConfig`, the `fleetwise worker` options, and the ModelDeployment's engine section
(`fleetwise/spec.py`, whose CRD schema in charts/ tests/test_spec.py checks against it)."""

BLOCK_SIZE = 16                # tokens per KV block
MAX_NUM_SEQS = 64              # sequences in the running batch
MAX_NUM_BATCHED_TOKENS = 2048  # the per-step token budget; longer prompts are chunked
DTYPE = "auto"                 # bfloat16 on CUDA, float32 on the CPU
DEVICE = "auto"                # cuda when present
KV_CACHE_MIB = 256             # KV memory when the number of blocks is not given
MAX_WAITING = 1024             # queue bound; beyond it requests are refused (429)
KV_LEASE_SECONDS = 30.0        # prefill role: how long a finished prompt's blocks wait for a decode worker
MAX_KV_LEASES = 64             # prefill role: prompts held for decode workers at once; beyond it 429
MAX_KV_LEASE_FRACTION = 0.5    # prefill role: the share of the KV blocks leases may hold; beyond it 429
HEALTH_STALL_SECONDS = 30.0    # /health turns 503 when one engine step takes longer
HEALTH_FAILED_STEPS = 3        # /health turns 503 after this many engine steps in a row failed every sequence
MAX_LOGPROBS = 20              # vLLM's --max-logprobs: logprobs and top_logprobs at most this

# what one request may ask of a worker (the HTTP API's limits)
MAX_N = 128                    # choices per prompt (n, best_of)
MAX_PROMPTS = 128              # prompts in one completion request's list
MAX_STOP_STRINGS = 16          # stop strings per request (each is searched for after every token)
MAX_STOP_CHARS = 256           # characters per stop string
MAX_BODY_MIB = 32              # request body; a larger one gets 413 before it is parsed

# `fleetwise worker`'s two listeners when run by hand (a pod's are in fleetwise/addresses.py)
PORT = 8001                    # public: the OpenAI API, /v1/models, /health, /metrics
INTERNAL_PORT = 9001           # internal: /internal/*, the completion routes and /health, with the shared token
