"""The accelerator catalogue: what a pool's `accelerator.type` means on a cluster and on a bill.

The built-in entries live in accelerators.yaml beside this file. Users add or override entries
without a release by passing a file of the same schema (for instance a mounted ConfigMap) to
`disagg run --accelerator-catalog`; an override entry replaces the built-in one of the same name
field by field (so a price can be changed alone).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class AcceleratorSpecs:
    """Per-accelerator peak figures the capacity model plans with."""

    bf16_flops: float
    fp8_flops: float
    memory_bytes: float
    memory_bandwidth: float
    interconnect_bandwidth: float

    def peak_flops(self, dtype: str) -> float:
        """Dense peak FLOP/s for matmuls in `dtype` (fp8 and narrower use the fp8 rate)."""
        return self.fp8_flops if dtype in ("fp8", "int8", "int4") else self.bf16_flops


@dataclass(frozen=True)
class Accelerator:
    """One accelerator type of the catalogue."""

    name: str
    vendor: str
    description: str
    resource_name: str
    node_labels: dict[str, str]
    instance_types: tuple[str, ...]
    per_node: int
    specs: AcceleratorSpecs
    usd_per_hour: float
    price_source: str
    priced: bool = True
    """False when the catalogue gives no hourly price: the planner shows such options unpriced."""
    fabric: str = ""
    """The network between nodes (efa, infiniband, ethernet); empty when unknown."""
    scale_out_bandwidth: float = 0.0
    """Bytes/s one accelerator sends to other nodes (one direction); 0 when unknown."""
    scale_up_domain: int = 0
    """Accelerators in the fast domain when it spans nodes (NVL72, UltraServer); 0: one node."""
    scale_up_label: str = ""
    """The node label naming that fast domain (e.g. nvidia.com/gpu.clique)."""
    topology_labels: tuple[str, ...] = ()
    """Node labels naming a network domain, narrowest first; the first packs a multi-node worker."""
    memory_kind: str = "hbm"
    """hbm, or sram: weights and KV cache held in on-chip SRAM over many chips."""
    plan_only: bool = False
    """No Kubernetes device plugin exposes it: the planner sizes it, a pool cannot request it."""
    efficiency: dict[str, float] = field(default_factory=dict)
    """Overrides of the capacity model's efficiency factors (field names of `Efficiency`)."""
    sources: dict[str, str] = field(default_factory=dict)
    """Where the figures come from."""

    @property
    def domain_size(self) -> int:
        """Accelerators reachable over the fast links: one node, or the scale-up domain."""
        return max(self.per_node, self.scale_up_domain)


@dataclass(frozen=True)
class AcceleratorCatalog:
    """All known accelerator types by name."""

    accelerators: dict[str, Accelerator] = field(default_factory=dict)

    def get(self, name: str) -> Accelerator | None:
        return self.accelerators.get(name)

    def names(self) -> list[str]:
        return sorted(self.accelerators)

    def __getitem__(self, name: str) -> Accelerator:
        try:
            return self.accelerators[name]
        except KeyError:
            raise KeyError(f"unknown accelerator type {name!r}; known: {', '.join(self.names())}") from None


class CatalogError(ValueError):
    """A catalogue file that cannot be used, with the entry and field at fault."""


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name)


def _parse(name: str, entry: dict[str, Any]) -> Accelerator:
    try:
        specs = entry["specs"]
        price = entry.get("price", {})
        scale_out = entry.get("scaleOut") or {}
        scale_up = entry.get("scaleUp") or {}
        memory_kind = str(entry.get("memoryKind", "hbm"))
        if memory_kind not in ("hbm", "sram"):
            raise CatalogError(f"accelerator {name!r}: memoryKind must be hbm or sram, got {memory_kind!r}")
        return Accelerator(
            name=name,
            vendor=str(entry["vendor"]),
            description=str(entry.get("description", name)),
            resource_name=str(entry["resourceName"]),
            node_labels={str(k): str(v) for k, v in entry.get("nodeLabels", {}).items()},
            instance_types=tuple(str(t) for t in entry.get("instanceTypes", [])),
            per_node=int(entry.get("perNode", 8)),
            specs=AcceleratorSpecs(
                bf16_flops=float(specs["bf16Flops"]),
                fp8_flops=float(specs.get("fp8Flops", specs["bf16Flops"])),
                memory_bytes=float(specs["memoryBytes"]),
                memory_bandwidth=float(specs["memoryBandwidth"]),
                interconnect_bandwidth=float(specs.get("interconnectBandwidth", 0.0)),
            ),
            usd_per_hour=float(price.get("usdPerHour", 0.0)),
            price_source=str(price.get("source", "")),
            priced="usdPerHour" in price,
            fabric=str(scale_out.get("fabric", "")),
            scale_out_bandwidth=float(scale_out.get("bandwidthPerAccelerator", 0.0)),
            scale_up_domain=int(scale_up.get("accelerators", 0)),
            scale_up_label=str(scale_up.get("label", "")),
            topology_labels=tuple(str(label) for label in entry.get("topologyLabels", [])),
            memory_kind=memory_kind,
            plan_only=bool(entry.get("planOnly", False)),
            efficiency={_snake(str(k)): float(v) for k, v in (entry.get("efficiency") or {}).items()},
            sources={str(k): str(v) for k, v in (entry.get("sources") or {}).items()},
        )
    except KeyError as missing:
        raise CatalogError(f"accelerator {name!r}: missing field {missing.args[0]!r}") from None
    except (TypeError, ValueError) as bad:
        raise CatalogError(f"accelerator {name!r}: {bad}") from None


def builtin_entries() -> dict[str, Any]:
    text = resources.files("disagg.catalog").joinpath("accelerators.yaml").read_text()
    entries: dict[str, Any] = yaml.safe_load(text)["accelerators"]
    return entries


def load_catalog(overrides: Path | str | None = None) -> AcceleratorCatalog:
    """The built-in catalogue, with the entries of `overrides` (a YAML file) merged over it."""
    entries = builtin_entries()
    if overrides is not None:
        try:
            extra = yaml.safe_load(Path(overrides).read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise CatalogError(f"accelerator catalogue {overrides}: {error}") from None
        if not isinstance(extra, dict) or not isinstance(extra.get("accelerators", {}), dict):
            raise CatalogError(f"accelerator catalogue {overrides}: expected a mapping under 'accelerators'")
        for name, entry in extra.get("accelerators", {}).items():
            entries[name] = _merge(entries.get(name, {}), entry)
    return AcceleratorCatalog({name: _parse(name, entry) for name, entry in entries.items()})


DEFAULT_CATALOG = load_catalog()
