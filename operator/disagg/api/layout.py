"""Checks of a pool's worker layout (nodes and parallelism) against the model, the node and the engine.

The schema's CEL rules check the arithmetic (tensor x pipeline x data fills whole pods); these need the
model's shape, the accelerator catalogue and the engine: what each engine can run across nodes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from disagg.api.v1alpha1 import InferenceServiceSpec, PoolSpec
from disagg.catalog.accelerators import Accelerator
from disagg.engines import engine_adapter, owned_flag

if TYPE_CHECKING:
    from disagg.api.validate import FieldError

def layout_errors(
    role: str, pool: PoolSpec, spec: InferenceServiceSpec, accelerator: Accelerator | None
) -> list[FieldError]:
    """Every problem of one pool's layout; empty when the engine can run it."""
    from disagg.api.validate import FieldError

    field = f"spec.{role}"
    par = pool.parallelism
    errors: list[FieldError] = []
    arch = spec.model.architecture
    nodes = pool.worker_nodes
    if arch is not None:
        if par.pipeline > arch.layers:
            errors.append(FieldError(f"{field}.parallelism.pipeline",
                                     f"{par.pipeline} stages exceed model.architecture.layers ({arch.layers})"))
        if arch.attention_heads is not None and arch.attention_heads % par.tensor:
            errors.append(FieldError(f"{field}.parallelism.tensor", f"{par.tensor} does not divide "
                                     f"model.architecture.attentionHeads ({arch.attention_heads})"))
        if par.expert:
            moe = arch.experts is not None or (arch.active_parameters or arch.parameters) < arch.parameters
            ep = par.tensor * par.data
            if not moe:
                errors.append(FieldError(f"{field}.parallelism.expert", "expert parallelism needs a mixture-of-"
                                         "experts model (set model.architecture.experts or activeParameters)"))
            elif arch.experts is not None and arch.experts % ep:
                errors.append(FieldError(f"{field}.parallelism.expert", f"the expert-parallel group of tensor x "
                                         f"data = {ep} accelerators does not divide model.architecture.experts "
                                         f"({arch.experts})"))
    if nodes > 1:
        errors += _engine_errors(field, pool, spec, nodes)
        key = spec.topology.key if spec.topology is not None else None
        if key is None and not (accelerator is not None and accelerator.topology_labels):
            errors.append(FieldError("spec.topology.key", f"the {role} workers span {nodes} nodes and the catalogue "
                                     "names no topology label for their accelerator: set the node label that names "
                                     "a network domain (e.g. topology.k8s.aws/network-node-layer-3)"))
    for index, arg in enumerate(pool.extra_args):
        errors += _multinode_flag(f"{field}.extraArgs[{index}]", arg, pool, spec)
    for index, arg in enumerate(spec.engine.extra_args):
        errors += _multinode_flag(f"spec.engine.extraArgs[{index}]", arg, pool, spec)
    return errors


def _engine_errors(field: str, pool: PoolSpec, spec: InferenceServiceSpec, nodes: int) -> list[FieldError]:
    from disagg.api.validate import FieldError

    return [FieldError(at, message) for at, message in engine_adapter(spec.engine).layout_errors(field, pool, nodes)]


def _multinode_flag(field: str, arg: str, pool: PoolSpec, spec: InferenceServiceSpec) -> list[FieldError]:
    from disagg.api.validate import FieldError

    par = pool.parallelism
    if not (pool.multi_node or par.pipeline > 1 or par.data > 1 or par.expert):
        return []
    # every spelling the engine's parser takes (`--pipeline_parallel_size`, `--pp-s=2`, `-e`), as for OWNED_FLAGS
    flag = owned_flag(spec.engine.kind, arg, engine_adapter(spec.engine).multinode_flags)
    if flag is not None:
        return [FieldError(field, f"{arg!r} is {flag} as {spec.engine.kind} reads it, set by the operator from "
                           "parallelism and nodes; remove it from extraArgs")]
    return []
