"""Capacity model: roofline throughput and memory of prefill and decode replicas, and the planner."""

from disagg.capacity.models import (
    BUILTIN_MODELS,
    ModelConfigError,
    ModelShape,
    builtin_model,
    from_architecture,
    from_hf_config,
)
from disagg.capacity.roofline import (
    DEFAULT_EFFICIENCY,
    Efficiency,
    decode_max_batch,
    decode_step_seconds,
    decode_tokens_per_s,
    kv_capacity_tokens,
    kv_transfer_seconds,
    prefill_seconds,
    prefill_tokens_per_s,
)

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_EFFICIENCY",
    "Efficiency",
    "ModelConfigError",
    "ModelShape",
    "builtin_model",
    "decode_max_batch",
    "decode_step_seconds",
    "decode_tokens_per_s",
    "from_architecture",
    "from_hf_config",
    "kv_capacity_tokens",
    "kv_transfer_seconds",
    "prefill_seconds",
    "prefill_tokens_per_s",
]
