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


def _parse(name: str, entry: dict[str, Any]) -> Accelerator:
    try:
        specs = entry["specs"]
        price = entry.get("price", {})
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
