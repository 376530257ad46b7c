"""Our autoscaler in the simulator: the operator's own `decide()`, called exactly as the operator calls it."""

from __future__ import annotations

from dataclasses import dataclass, field

from disagg.api.v1alpha1 import InferenceServiceSpec
from disagg.capacity.models import to_architecture
from disagg.catalog.accelerators import AcceleratorCatalog
from disagg.scaling.policy import LoadPicture, PolicySettings, PolicyState, decide
from disagg.sim.engine import SimSetup


def service_spec(setup: SimSetup, autoscaled: bool = True) -> InferenceServiceSpec:
    """The InferenceService a simulated setup stands for (validated by the API model)."""

    def pool(role: str) -> dict[str, object]:
        pool_setup = setup.prefill if role == "prefill" else setup.decode
        body: dict[str, object] = {
            "replicas": pool_setup.initial_replicas,
            "accelerator": {"type": pool_setup.accelerator.name, "count": pool_setup.accelerators_per_replica},
            "parallelism": {"tensor": pool_setup.tensor_parallel},
        }
        if autoscaled:
            body["autoscaling"] = {"minReplicas": pool_setup.min_replicas, "maxReplicas": pool_setup.max_replicas}
        return body

    name = setup.model.hf_name or setup.model.name
    return InferenceServiceSpec.model_validate(
        {
            "model": {
                "name": name,
                "uri": f"hf://{name}",
                "architecture": to_architecture(setup.model).model_dump(by_alias=True, exclude_none=True),
            },
            "slo": {
                "ttftMs": max(1, round(setup.ttft_s * 1000)),
                "itlMs": max(1, round(setup.itl_s * 1000)),
                "percentile": setup.percentile,
            },
            "acceleratorBudget": setup.accelerator_budget,
            "prefill": pool("prefill"),
            "decode": pool("decode"),
        }
    )


@dataclass
class DisaggController:
    """`disagg` (ours): disagg.scaling.policy.decide(), the code the operator runs, every `settings.tick_s`."""

    setup: SimSetup
    catalog: AcceleratorCatalog
    settings: PolicySettings = field(default_factory=PolicySettings)
    name: str = "disagg"
    state: PolicyState = field(default_factory=PolicyState)
    last_reasons: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.spec = service_spec(self.setup)

    @property
    def interval_s(self) -> float:
        return self.settings.tick_s

    def decide(self, now: float, picture: LoadPicture | None, current: dict[str, int]) -> dict[str, int]:
        decisions, self.state = decide(picture, self.spec, current, self.state, now, self.settings, self.catalog)
        self.last_reasons = {role: decision.reason for role, decision in decisions.items()}
        return {role: decision.desired for role, decision in decisions.items()}
