"""The engine adapters and their registry: one module per engine behind `base.EngineAdapter`.

Adding an engine is one module here and its entry in `ENGINES`; the rest of the operator looks the
adapter up by `spec.engine.kind`.

The engines read their command line more loosely than it looks: vLLM's FlexibleArgumentParser turns `_`
into `-` in a flag's name and reads `--flag.key=value` as a key of the JSON flag `--flag` (set after
everything else); both parsers are argparse with abbreviations allowed, so a unique prefix of a flag
(`--disaggregation-mod`) is that flag, and `--flag=value` is `--flag value`. A flag the operator sets is
refused in extraArgs however it is spelled (`owned_flag`, and `owned_flag_cel` for the CRD).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from disagg.engines.base import (
    MOONCAKE_BOOTSTRAP_PORT,
    NIXL_SIDE_CHANNEL_PORT,
    ROUTER_METRICS_PORT,
    EngineAdapter,
    MetricNames,
)
from disagg.engines.sglang import SGLang
from disagg.engines.vllm import VLLM
from disagg.engines.vllm import kv_transfer_config as vllm_kv_transfer_config
from disagg.wellknown import Role as Role  # where engine flags and metrics are looked up by role

if TYPE_CHECKING:
    from disagg.api.v1alpha1 import EngineSpec

Engine = EngineAdapter

ENGINES: dict[str, EngineAdapter] = {"vllm": VLLM(), "sglang": SGLang()}

# Which (prefill vendor, decode vendor) pairs a connector can bridge. Same-vendor pairs always work;
# across vendors only NIXL over UCX/libfabric (host-staged or dmabuf RDMA) moves KV between the two
# memory systems. Mooncake's transfer engine registers CUDA memory only for GPU-direct paths, so we
# refuse it across vendors rather than let transfers fail silently at run time.
CROSS_VENDOR_CONNECTORS = frozenset({"nixl"})

# the adapters' flag tables by engine (the CRD's rules and the flag tests read them so)
OWNED_FLAGS = {kind: adapter.owned_flags for kind, adapter in ENGINES.items()}
OWNED_WITH_OBJECT_STORAGE = {kind: adapter.owned_with_object_storage for kind, adapter in ENGINES.items()}
"""Owned when the weights stream from s3:// or gs:// (the operator sets --load-format runai_streamer)."""
OWNED_WITH_CPU_TIER = {kind: adapter.owned_with_cpu_tier for kind, adapter in ENGINES.items()}
OWNED_WITH_DISK_TIER = {kind: adapter.owned_with_disk_tier for kind, adapter in ENGINES.items()}
MULTINODE_FLAGS = {kind: adapter.multinode_flags for kind, adapter in ENGINES.items()}
"""Owned when a pool's workers run several ranks or span nodes (pipeline, data or expert parallelism)."""

OWNED_ENV = (
    "POD_IP", "HF_HOME", "VLLM_NIXL_SIDE_CHANNEL_HOST", "VLLM_NIXL_SIDE_CHANNEL_PORT",
    "VLLM_MOONCAKE_BOOTSTRAP_PORT", "LMCACHE_LOCAL_CPU", "LMCACHE_MAX_LOCAL_CPU_SIZE", "LMCACHE_CHUNK_SIZE",
    "LMCACHE_LOCAL_DISK", "LMCACHE_MAX_LOCAL_DISK_SIZE", "SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR",
    "SGLANG_DISAGGREGATION_NIXL_BACKEND",
)
"""Environment variables the operator sets in engine containers (a second entry would clash with its
own: the API server refuses the duplicate, or the user's value would silently lose)."""


def engine_adapter(engine: EngineSpec) -> EngineAdapter:
    """The adapter of a spec's engine: a built-in one, or one made from `engine.custom`."""
    if engine.custom is not None:
        from disagg.engines.custom import Custom  # custom builds on the built-in adapters

        return Custom(engine.custom)
    return ENGINES[engine.kind]


def kv_port(connector: str, protocol: str, explicit: int | None) -> int:
    """The side-channel/bootstrap port for a connector: the explicit one or the default of the engine whose
    P/D protocol the service speaks (`EngineSpec.protocol`)."""
    return ENGINES[protocol].kv_port(connector, explicit)


def flag_key(engine: str, arg: str) -> tuple[str, bool] | None:
    """The option string `arg` names as the engine's parser reads it, and whether it may be a prefix
    (an abbreviation); None for an argument that is no flag."""
    if not arg.startswith("-") or arg in ("-", "--"):
        return None
    dotted_flags = engine in ENGINES and ENGINES[engine].dotted_flags
    if arg.startswith("--"):
        key = arg.split("=", 1)[0]
        if dotted_flags:  # the part before a '.' is the flag (JSON key path after); '_' reads as '-'
            key = key.split(".", 1)[0].replace("_", "-")
        return key, True
    # a single dash: `-tp=8` is -tp; `-t` alone may abbreviate -tp; vLLM reads `-t.x=1` as `-t '{"x": 1}'`,
    # an abbreviation again
    key = arg.split("=", 1)[0]
    dotted = dotted_flags and "." in key
    if dotted:
        key = key.split(".", 1)[0]
    return key, key == arg or dotted


def owned_flag(engine: str, arg: str, owned: dict[str, str]) -> str | None:
    """The flag of `owned` (option string -> shortest prefix) that `arg` sets in the engine, or None."""
    found = flag_key(engine, arg)
    if found is None:
        return None
    key, may_abbreviate = found
    for option, shortest in owned.items():
        if key == option or (may_abbreviate and key.startswith(shortest) and option.startswith(key)):
            return option
    return None


def owned_flag_cel(engine: str, owned: dict[str, str], arg: str) -> str:
    """A CEL expression true when the string `arg` sets a flag of `owned` (what `owned_flag` finds):
    its name, read as the engine reads it, is among the spellings of an owned flag."""
    long_forms: list[str] = []
    short_forms: list[str] = []
    abbreviations: list[str] = []
    for option, shortest in sorted(owned.items()):
        prefixes = [option[:end] for end in range(len(shortest), len(option) + 1)]
        if option.startswith("--"):
            long_forms += prefixes
        else:
            short_forms.append(option)
            abbreviations += prefixes[:-1]
    dotted_flags = engine in ENGINES and ENGINES[engine].dotted_flags
    key = f"{arg}.split('=')[0]" + (".split('.')[0]" if dotted_flags else "")
    long_key = f"{key}.replace('_', '-')" if dotted_flags else key
    terms = [f"({arg}.startsWith('--') && {long_key} in {long_forms!r})"]
    if short_forms:
        dotted = f" || ({arg}.split('=')[0].contains('.') && {key} in {abbreviations!r})" if dotted_flags else ""
        terms.append(f"(!{arg}.startsWith('--') && ({key} in {short_forms!r} || {arg} in {abbreviations!r}{dotted}))")
    return "(" + " || ".join(terms) + ")"


__all__ = [
    "CROSS_VENDOR_CONNECTORS",
    "ENGINES",
    "MOONCAKE_BOOTSTRAP_PORT",
    "MULTINODE_FLAGS",
    "NIXL_SIDE_CHANNEL_PORT",
    "OWNED_ENV",
    "OWNED_FLAGS",
    "OWNED_WITH_CPU_TIER",
    "OWNED_WITH_DISK_TIER",
    "OWNED_WITH_OBJECT_STORAGE",
    "ROUTER_METRICS_PORT",
    "Engine",
    "EngineAdapter",
    "MetricNames",
    "Role",
    "engine_adapter",
    "flag_key",
    "kv_port",
    "owned_flag",
    "owned_flag_cel",
    "vllm_kv_transfer_config",
]
