"""The scoring service (HTTP API, batching, metrics). Never imports torch or training."""
