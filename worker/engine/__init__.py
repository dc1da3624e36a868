"""The batched inference core: requests, sequences, paged-block bookkeeping, scheduling, the step loop."""
