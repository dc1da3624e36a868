"""The worker's HTTP API: OpenAI endpoints, the request service behind them, the handoff routes."""
