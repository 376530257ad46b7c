"""disagg: a Kubernetes operator for disaggregated (prefill/decode) LLM inference."""

__version__ = "0.1.0"

GROUP = "disagg.dev"
VERSION = "v1alpha1"
KIND = "InferenceService"
PLURAL = "inferenceservices"
