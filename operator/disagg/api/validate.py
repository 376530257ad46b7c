"""Validation of an InferenceService: the schema's checks plus those that need the catalogues.

The API server rejects what the CRD schema and its CEL rules can express. What they cannot (the
accelerator catalogue is configurable at run time, engine/vendor support, name lengths of children,
flags the operator owns) is checked here, and the same function backs `disagg validate`, so a user
sees the same message from the CLI as in the InferenceService's InvalidSpec condition.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError

from disagg.api.errors import FieldError, InvalidSpec
from disagg.api.manifest import prune_nulls
from disagg.api.v1alpha1 import ROLES, InferenceServiceSpec
from disagg.catalog.accelerators import AcceleratorCatalog
from disagg.catalog.engines import CROSS_VENDOR_CONNECTORS, ENGINES

# The longest child name is `<name>-prefill-kv`; Service names are DNS-1035 labels (<= 63 chars).
MAX_NAME_LENGTH = 63 - len("-prefill-kv")
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

# Flags the operator sets itself; a user passing them in extraArgs would silently fight the operator.
MANAGED_FLAGS = {
    "vllm": {
        "--host", "--port", "--served-model-name", "--tensor-parallel-size", "-tp", "--kv-transfer-config",
        "--model", "--revision",
    },
    "sglang": {
        "--host", "--port", "--served-model-name", "--tp-size", "--tensor-parallel-size", "--model-path", "--model",
        "--disaggregation-mode",
        "--disaggregation-transfer-backend", "--disaggregation-bootstrap-port", "--revision",
        "--enable-metrics",
    },
}


def _loc(parts: tuple[int | str, ...]) -> str:
    path = "spec"
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def parse_spec(spec: Any) -> InferenceServiceSpec:
    """The spec as a model, or InvalidSpec naming each bad field the way a user wrote it."""
    if not isinstance(spec, dict):
        raise InvalidSpec([FieldError("spec", "must be an object")])
    try:
        return InferenceServiceSpec.model_validate(spec)
    except ValidationError as error:
        errors = []
        for item in error.errors():
            message = item["msg"].removeprefix("Value error, ")
            if item["type"] == "extra_forbidden":
                message = "unknown field"
            elif item["type"] == "literal_error":
                message = f"{item['msg']} (got {item.get('input')!r})"
            errors.append(FieldError(_loc(tuple(item["loc"])), message))
        raise InvalidSpec(errors) from None


def check_spec(name: str, spec: InferenceServiceSpec, catalog: AcceleratorCatalog) -> list[FieldError]:
    """Every problem the schema cannot see; empty when the spec can be served."""
    errors: list[FieldError] = []
    if len(name) > MAX_NAME_LENGTH or not DNS_1035.match(name):
        errors.append(FieldError(
            "metadata.name",
            f"{name!r} must be a DNS-1035 label of at most {MAX_NAME_LENGTH} characters (lowercase letters, "
            "digits and '-', starting with a letter) so that its children's names are valid",
        ))
    engine = ENGINES[spec.engine.kind]
    vendors: dict[str, str] = {}
    for role in ROLES:
        pool = getattr(spec, role)
        acc = pool.accelerator
        field = f"spec.{role}"
        if acc.type is not None:
            accelerator = catalog.get(acc.type)
            if accelerator is None:
                errors.append(FieldError(
                    f"{field}.accelerator.type",
                    f"unknown accelerator type {acc.type!r}; known types: {', '.join(catalog.names())} "
                    "(add one with --accelerator-catalog)",
                ))
                continue
            vendors[role] = accelerator.vendor
            if acc.count > accelerator.per_node:
                errors.append(FieldError(
                    f"{field}.accelerator.count",
                    f"{acc.count} exceeds the {accelerator.per_node} accelerators a {acc.type} node has; "
                    "a worker must fit on one node",
                ))
            if accelerator.vendor not in engine.vendors:
                errors.append(FieldError(
                    f"{field}.accelerator.type",
                    f"engine {spec.engine.kind} does not run on {accelerator.vendor} accelerators ({acc.type}); "
                    f"it supports {', '.join(sorted(engine.vendors))}",
                ))
            elif (pool.image or spec.engine.image) is None and accelerator.vendor not in engine.images:
                errors.append(FieldError(
                    f"{field}.image",
                    f"no default {spec.engine.kind} image for {accelerator.vendor} accelerators; "
                    f"set {role}.image (or engine.image) to a {accelerator.vendor} build of {spec.engine.kind}",
                ))
        if pool.parallelism.tensor & (pool.parallelism.tensor - 1):
            errors.append(FieldError(
                f"{field}.parallelism.tensor",
                f"{pool.parallelism.tensor} is not a power of two; engines shard attention heads by it",
            ))
        arch = spec.model.architecture
        if arch is not None and arch.kv_lora_rank is None and pool.parallelism.tensor > 1:
            heads = arch.kv_heads
            if heads % pool.parallelism.tensor and pool.parallelism.tensor % heads:
                errors.append(FieldError(
                    f"{field}.parallelism.tensor",
                    f"{pool.parallelism.tensor} neither divides nor is a multiple of "
                    f"model.architecture.kvHeads ({heads})",
                ))
        if pool.autoscaling is not None and spec.accelerator_budget is not None:
            floor = pool.autoscaling.min_replicas * acc.count
            if floor > spec.accelerator_budget:
                errors.append(FieldError(
                    f"{field}.autoscaling.minReplicas",
                    f"{pool.autoscaling.min_replicas} replicas x {acc.count} accelerators exceed "
                    f"acceleratorBudget {spec.accelerator_budget}",
                ))
        for index, arg in enumerate(pool.extra_args):
            errors.extend(_managed_flag(f"{field}.extraArgs[{index}]", arg, spec.engine.kind))
    for index, arg in enumerate(spec.engine.extra_args):
        errors.extend(_managed_flag(f"spec.engine.extraArgs[{index}]", arg, spec.engine.kind))
    budget = spec.accelerator_budget
    fixed = [getattr(spec, role) for role in ROLES if getattr(spec, role).autoscaling is None]
    if budget is not None and fixed and not any(e.field.endswith(".autoscaling.minReplicas") for e in errors):
        # the autoscaler shares the budget out over what the fixed pools leave: they must fit in it
        need = sum(
            pool.accelerator.count * (pool.replicas if pool.autoscaling is None else pool.autoscaling.min_replicas)
            for pool in (getattr(spec, role) for role in ROLES)
        )
        if need > budget:
            errors.append(FieldError(
                "spec.acceleratorBudget",
                f"{budget} is less than the {need} accelerators the pools hold at least (a fixed pool its "
                "replicas x accelerator.count, an autoscaled one minReplicas x accelerator.count)",
            ))
    if spec.engine.kind == "vllm" and spec.kv_transfer.connector == "mooncake":
        # vllm-router 0.1.17 asks a prefill's Mooncake bootstrap server for its engine id only for
        # statically listed prefills; for pods it discovers it forwards no kv_transfer_params, so
        # decode silently recomputes every prompt. Refuse rather than serve that.
        errors.append(FieldError(
            "spec.kvTransfer.connector",
            "mooncake with engine vllm is not supported: vllm-router does not hand Mooncake bootstrap data to "
            "pods it discovers; use connector nixl with vllm, or engine sglang with mooncake",
        ))
    if spec.kv_transfer.connector not in engine.connectors:
        errors.append(FieldError(
            "spec.kvTransfer.connector", f"{spec.engine.kind} has no {spec.kv_transfer.connector} connector"
        ))
    if (
        len(set(vendors.values())) > 1
        and spec.kv_transfer.connector not in CROSS_VENDOR_CONNECTORS
    ):
        errors.append(FieldError(
            "spec.kvTransfer.connector",
            f"{spec.kv_transfer.connector} cannot move KV between {vendors['prefill']} (prefill) and "
            f"{vendors['decode']} (decode) accelerators; use {', '.join(sorted(CROSS_VENDOR_CONNECTORS))}",
        ))
    if spec.model.uri.startswith(("s3://", "gs://")) and spec.engine.kind != "vllm":
        errors.append(FieldError(
            "spec.model.uri", f"{spec.engine.kind} loads weights from hf:// or pvc:// only (got {spec.model.uri})"
        ))
    if spec.model.uri.startswith("pvc://"):
        claim = spec.model.uri.removeprefix("pvc://").split("/", 1)[0]
        if not re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", claim):
            errors.append(FieldError("spec.model.uri", f"pvc://CLAIM/path: {claim!r} is not a valid claim name"))
    if spec.kv_cache is not None and spec.kv_cache.cpu_offload_gi_b is None and spec.kv_cache.disk is None:
        errors.append(FieldError("spec.kvCache", "set cpuOffloadGiB, disk, or both (or remove kvCache)"))
    if spec.kv_cache is not None and spec.kv_cache.disk is not None and spec.kv_cache.cpu_offload_gi_b is None:
        errors.append(FieldError("spec.kvCache.cpuOffloadGiB", "a disk tier needs a CPU tier above it"))
    return errors


def _managed_flag(field: str, arg: str, engine: str) -> list[FieldError]:
    flag = arg.split("=", 1)[0]
    if flag in MANAGED_FLAGS[engine]:
        return [FieldError(field, f"{flag} is set by the operator from the spec; remove it from extraArgs")]
    return []


def validate_service(body: dict[str, Any], catalog: AcceleratorCatalog) -> InferenceServiceSpec:
    """The spec of an InferenceService object if it can be served, else InvalidSpec with every error.
    The spec is read as the API server reads it: the nulls it prunes are gone first."""
    metadata = body.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    name = metadata.get("name") or (f"{metadata['generateName']}xxxxx" if metadata.get("generateName") else "")
    spec = parse_spec(prune_nulls(body.get("spec")))
    errors = check_spec(str(name), spec, catalog)
    if errors:
        raise InvalidSpec(errors)
    return spec


__all__ = ["FieldError", "InvalidSpec", "check_spec", "parse_spec", "validate_service"]
