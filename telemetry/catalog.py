"""Metric names shared by the worker, the router, the controllers and the dashboards.

Serving metrics keep vLLM's names so that existing dashboards and endpoint pickers work;
fleetwise's own metrics carry the `fleetwise_` prefix.
"""

# vLLM-compatible serving metrics, labelled with model_name
NUM_REQUESTS_RUNNING = "vllm:num_requests_running"
NUM_REQUESTS_WAITING = "vllm:num_requests_waiting"
KV_CACHE_USAGE = "vllm:kv_cache_usage_perc"
TIME_TO_FIRST_TOKEN = "vllm:time_to_first_token_seconds"
INTER_TOKEN_LATENCY = "vllm:inter_token_latency_seconds"
E2E_REQUEST_LATENCY = "vllm:e2e_request_latency_seconds"
PROMPT_TOKENS = "vllm:prompt_tokens"          # counter, exposed as ..._total
GENERATION_TOKENS = "vllm:generation_tokens"  # counter, exposed as ..._total
NUM_PREEMPTIONS = "vllm:num_preemptions"      # counter
PREFIX_CACHE_QUERIES = "vllm:prefix_cache_queries"  # counter, tokens
PREFIX_CACHE_HITS = "vllm:prefix_cache_hits"        # counter, tokens
REQUEST_SUCCESS = "vllm:request_success"      # counter, label finished_reason

# fleetwise worker metrics, labelled with model_name and role
STEP_SECONDS = "fleetwise_step_seconds"
STEP_FORWARD_SECONDS = "fleetwise_step_forward_seconds"
STEP_DEVICE_SECONDS = "fleetwise_step_device_seconds"  # histogram: the forward's device time (GPU or engine thread CPU)
BATCH_TOKENS = "fleetwise_batch_tokens"
BATCH_SEQS = "fleetwise_batch_seqs"
KV_BLOCKS_USED = "fleetwise_kv_blocks_used"
KV_BLOCKS_FREE = "fleetwise_kv_blocks_free"
REQUESTS_REJECTED = "fleetwise_requests_rejected"  # counter, label reason
REQUEST_ERRORS = "fleetwise_request_errors"        # counter: requests failed inside the engine
ENGINE_HEARTBEAT_AGE = "fleetwise_engine_heartbeat_age_seconds"
POWER_CAP_WATTS = "fleetwise_power_cap_watts"  # gauge, W per GPU: the cap in force; no series while uncapped
POWER_CAP_EXPIRY = "fleetwise_power_cap_expiry_timestamp_seconds"  # gauge: when the cap lapses unless renewed

# fleetwise node-agent (real GPUs): it also exports the DCGM series below and the caps it applied
NODE_AGENT_ERRORS = "fleetwise_node_agent_errors"  # counter, label what: gpu_read, set_limit, pod_resources, pods_watch

# prefill -> decode handoff
KV_TRANSFER_BYTES = "fleetwise_kv_transfer_bytes"      # counter, label direction (sent|received)
KV_TRANSFER_SECONDS = "fleetwise_kv_transfer_seconds"  # histogram, one pull
KV_RECOMPUTES = "fleetwise_kv_recomputes"              # counter, label reason: prompts recomputed instead
KV_LEASES = "fleetwise_kv_leases"                      # gauge: prompts held for a decode worker
KV_LEASES_EXPIRED = "fleetwise_kv_leases_expired"      # counter: leases nobody pulled in time
KV_EXPORTED = "fleetwise_kv_exported"                  # counter: running choices handed over with their KV (drains)
# per KV link, on the receiving (decode) worker, label peer: the sending worker's internal URL
KV_PEER_SECONDS = "fleetwise_kv_peer_transfer_seconds"    # counter: seconds spent pulling from the peer
KV_PEER_BYTES = "fleetwise_kv_peer_transfer_bytes"        # counter: bytes pulled from the peer
KV_PEER_FAILURES = "fleetwise_kv_peer_transfer_failures"  # counter: pulls from the peer that failed

# router, labelled with model_name (and role / url where it says)
ROUTER_REQUESTS = "fleetwise_router_requests"                 # counter: model_name, mode, status
ROUTER_DECISIONS = "fleetwise_router_decisions"               # counter: model_name, role, policy
ROUTER_RETRIES = "fleetwise_router_retries"                   # counter: model_name, role
ROUTER_INFLIGHT = "fleetwise_router_inflight"                 # gauge
ROUTER_REPLICA_HEALTHY = "fleetwise_router_replica_healthy"   # gauge: model_name, role, url
ROUTER_REPLICA_OUTSTANDING = "fleetwise_router_replica_outstanding"  # gauge: model_name, role, url
ROUTER_REPLICA_SERVER_ERRORS = "fleetwise_router_replica_server_errors"  # counter: model_name, role, url: 5xx answers
ROUTER_REPLICA_TIMEOUTS = "fleetwise_router_replica_timeouts"  # counter: model_name, role, url
ROUTER_REQUEST_SECONDS = "fleetwise_router_request_seconds"   # histogram
ROUTER_TTFT_SECONDS = "fleetwise_router_ttft_seconds"         # histogram: to the first streamed chunk
ROUTER_MIGRATIONS = "fleetwise_router_migrations"             # counter: model_name, reason (worker_failed, drain)
ROUTER_MIGRATION_GAP_SECONDS = "fleetwise_router_migration_gap_seconds"  # histogram: the client's wait at a move
ROUTER_UNMIGRATABLE = "fleetwise_router_unmigratable"         # counter: model_name, reason
ROUTER_HANDOFF_RETRIES = "fleetwise_router_handoff_retries"   # counter: model_name: prefills retried on kv_leases_full

# operator
OPERATOR_RECONCILES = "fleetwise_operator_reconciles"            # counter
OPERATOR_RECONCILE_ERRORS = "fleetwise_operator_reconcile_errors"  # counter: reason
OPERATOR_BIND_SECONDS = "fleetwise_operator_bind_seconds"        # histogram: pod created -> bound
OPERATOR_PENDING_PODS = "fleetwise_operator_pending_pods"        # gauge: reason
OPERATOR_API_REQUESTS = "fleetwise_operator_api_requests"        # counter: verb, resource
# records (incidents, actions) the operator sends to the admin API, queued through its outages
OPERATOR_ADMIN_UP = "fleetwise_operator_admin_api_up"            # gauge: 1 while sends reach the admin API
OPERATOR_ADMIN_OUTAGE_SECONDS = "fleetwise_operator_admin_outage_seconds"  # counter: time unable to send
OPERATOR_ADMIN_QUEUED = "fleetwise_operator_admin_records_queued"  # gauge
OPERATOR_ADMIN_SENT = "fleetwise_operator_admin_records_sent"    # counter
OPERATOR_ADMIN_DROPPED = "fleetwise_operator_admin_records_dropped"  # counter: reason (full, rejected)

OPERATOR_WORKERS = "fleetwise_operator_workers"                  # gauge: namespace, deployment, state (routability)
# each PowerBudget's loop (operator/power.py), labelled domain (the budget's name)
POWER_DOMAIN_WATTS = "fleetwise_power_domain_watts"              # gauge: the domain's draw, W; no sample while missing
POWER_DOMAIN_LIMIT_WATTS = "fleetwise_power_domain_limit_watts"  # gauge: its PowerBudget's limitWatts

# the operator's fault loops (operator/faults.py)
INCIDENTS_OPEN = "fleetwise_incidents_open"                      # gauge: namespace, policy, kind; open incidents

# Names the chart's alerts or the dashboards read before a part exports them; empty now that
# every one is exported, and tests/test_dashboards.py keeps it honest.
NOT_EXPORTED_YET: tuple[str, ...] = ()

# GPU telemetry under the DCGM exporter's names and labels (gpu, UUID, modelName, Hostname,
# and on Kubernetes pod, namespace, container), so the same PromQL reads a real DCGM exporter
# and the modelled GPU that stands in where there is none (telemetry/modelled_gpu.py)
DCGM_POWER_USAGE = "DCGM_FI_DEV_POWER_USAGE"                  # gauge, W
DCGM_POWER_MGMT_LIMIT = "DCGM_FI_DEV_POWER_MGMT_LIMIT"        # gauge, W: the power limit set
DCGM_ENFORCED_POWER_LIMIT = "DCGM_FI_DEV_ENFORCED_POWER_LIMIT"  # gauge, W: the limit the driver enforces
DCGM_TOTAL_ENERGY = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"    # counter, mJ
DCGM_SM_CLOCK = "DCGM_FI_DEV_SM_CLOCK"                        # gauge, MHz
DCGM_GPU_TEMP = "DCGM_FI_DEV_GPU_TEMP"                        # gauge, degrees C
DCGM_GPU_UTIL = "DCGM_FI_DEV_GPU_UTIL"                        # gauge, %
DCGM_XID_ERRORS = "DCGM_FI_DEV_XID_ERRORS"                    # gauge: the last XID error's code (0: none)
DCGM_ECC_SBE_VOL = "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL"            # counter: single-bit (corrected) ECC errors since load
DCGM_ECC_DBE_VOL = "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL"            # counter: double-bit (uncorrected) ECC errors since load
DCGM_LABELS = ("gpu", "UUID", "modelName", "Hostname")
