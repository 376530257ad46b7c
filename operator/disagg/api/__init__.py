"""The InferenceService API: models, CRD generation and catalogue-aware validation."""

from disagg.api.v1alpha1 import (
    ROLES,
    Condition,
    InferenceServiceSpec,
    InferenceServiceStatus,
    PoolSpec,
    PoolStatus,
)

__all__ = ["ROLES", "Condition", "InferenceServiceSpec", "InferenceServiceStatus", "PoolSpec", "PoolStatus"]
