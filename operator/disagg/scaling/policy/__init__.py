"""The autoscaling policy: a pure function from one load picture to the desired replicas of each pool.

The operator's loop (disagg.scaling.loop) calls `decide()` on every tick with the signals it read from
Prometheus; the simulator (`disagg simulate`, bench/) calls the very same function with signals computed
from a replayed trace. No I/O, no clock: time comes in as `now`, memory as `PolicyState` and goes out as a
new `PolicyState`. Why each default is what it is: docs/capacity-and-simulation.md.

Modules: `picture` (what the policy sees), `settings`, `state` (what it remembers), `model` (the capacity
model of a replica and what is learnt online), `prefill` and `decode` (each pool's size), `budget` (the
SLO's error budget), `step` (a step up in load), `decide` (stabilisation, bounds, the accelerator budget).
"""

from disagg.scaling.policy.budget import ErrorBudget
from disagg.scaling.policy.decide import decide
from disagg.scaling.policy.histogram import histogram_quantile, share_above
from disagg.scaling.policy.model import fit_ttft_model
from disagg.scaling.policy.picture import LoadPicture, PoolSignals
from disagg.scaling.policy.settings import PolicySettings
from disagg.scaling.policy.state import PolicyState, PoolDecision, PoolMemory

__all__ = [
    "ErrorBudget",
    "LoadPicture",
    "PolicySettings",
    "PolicyState",
    "PoolDecision",
    "PoolMemory",
    "PoolSignals",
    "decide",
    "fit_ttft_model",
    "histogram_quantile",
    "share_above",
]
