"""Model shapes for the capacity model: a built-in catalogue, Hugging Face config.json, and the API's spec.

Only what the roofline needs is kept: parameter counts (total, and active per token for mixture-of-experts
models), the attention geometry (layers, query heads, KV heads, head sizes, or the compressed latent width
of multi-head latent attention), and the data types weights and KV cache are served in.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from disagg.api.v1alpha1 import ModelArchitecture

DTYPE_BYTES: dict[str, float] = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}
"""Bytes per element of each served data type."""


class ModelConfigError(ValueError):
    """A model description that cannot be used, naming the field at fault."""


@dataclass(frozen=True)
class ModelShape:
    """The shape of one transformer model, as far as throughput and memory are concerned."""

    name: str
    parameters: float
    """Total parameters (all experts): what sits in accelerator memory."""
    active_parameters: float
    """Parameters one token passes through (the dense part plus the routed experts)."""
    layers: int
    hidden_size: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    """Width of one query/key head (for MLA: the non-rotary plus rotary part of a query head)."""
    v_head_dim: int
    """Width of one value head."""
    kv_lora_rank: int | None = None
    """MLA: width of the compressed KV latent cached per token and layer (replaces kv_heads x head_dim)."""
    qk_rope_head_dim: int = 0
    """MLA: rotary key width cached per token and layer beside the latent."""
    weight_dtype: str = "bf16"
    kv_dtype: str = "bf16"
    max_context: int = 131072
    hf_name: str = ""
    experts: int = 0
    """Mixture-of-experts: routed experts per MoE layer (0: a dense model)."""
    experts_per_token: int = 0
    """Mixture-of-experts: routed experts each token passes through."""
    expert_parameters: float = 0.0
    """Mixture-of-experts: parameters of all routed experts (what expert parallelism spreads)."""

    @property
    def is_moe(self) -> bool:
        return self.active_parameters < self.parameters

    @property
    def weight_bytes(self) -> float:
        """Bytes of all weights in memory."""
        return self.parameters * DTYPE_BYTES[self.weight_dtype]

    @property
    def kv_bytes_per_token(self) -> float:
        """KV-cache bytes one token of context holds, over all layers.

        GQA/MHA: keys and values of every KV head: 2 x layers x kv_heads x head_dim x bytes.
        MLA (DeepSeek): one latent of kv_lora_rank plus the rotary key per layer, no factor 2.
        """
        per_element = DTYPE_BYTES[self.kv_dtype]
        if self.kv_lora_rank is not None:
            return self.layers * (self.kv_lora_rank + self.qk_rope_head_dim) * per_element
        return 2.0 * self.layers * self.kv_heads * self.head_dim * per_element

    def attention_flops_per_token(self, context: float) -> float:
        """Attention FLOPs of one token attending to `context` earlier tokens (QK^T and AV, all layers)."""
        return 2.0 * self.layers * self.attention_heads * (self.head_dim + self.v_head_dim) * context

    def with_dtypes(self, weight_dtype: str | None = None, kv_dtype: str | None = None) -> ModelShape:
        """The same model served in other data types."""
        for value in (weight_dtype, kv_dtype):
            if value is not None and value not in DTYPE_BYTES:
                raise ModelConfigError(f"unknown dtype {value!r}; known: {', '.join(DTYPE_BYTES)}")
        return replace(
            self,
            weight_dtype=weight_dtype or self.weight_dtype,
            kv_dtype=kv_dtype or self.kv_dtype,
        )


# Architecture numbers from each model's published config.json (Hugging Face), parameter counts from
# the model cards. Weights default to fp8 for the large models (how they are usually served), bf16 KV.
BUILTIN_MODELS: dict[str, ModelShape] = {
    "llama-3.1-8b": ModelShape(
        name="llama-3.1-8b", hf_name="meta-llama/Llama-3.1-8B-Instruct",
        parameters=8.03e9, active_parameters=8.03e9, layers=32, hidden_size=4096,
        attention_heads=32, kv_heads=8, head_dim=128, v_head_dim=128, weight_dtype="bf16",
    ),
    "llama-3.1-70b": ModelShape(
        name="llama-3.1-70b", hf_name="meta-llama/Llama-3.1-70B-Instruct",
        parameters=70.6e9, active_parameters=70.6e9, layers=80, hidden_size=8192,
        attention_heads=64, kv_heads=8, head_dim=128, v_head_dim=128, weight_dtype="fp8",
    ),
    "qwen3-32b": ModelShape(
        name="qwen3-32b", hf_name="Qwen/Qwen3-32B",
        parameters=32.8e9, active_parameters=32.8e9, layers=64, hidden_size=5120,
        attention_heads=64, kv_heads=8, head_dim=128, v_head_dim=128, weight_dtype="bf16",
        max_context=40960,
    ),
    "qwen3-235b-a22b": ModelShape(
        name="qwen3-235b-a22b", hf_name="Qwen/Qwen3-235B-A22B",
        parameters=235.1e9, active_parameters=22.2e9, layers=94, hidden_size=4096,
        attention_heads=64, kv_heads=4, head_dim=128, v_head_dim=128, weight_dtype="fp8",
        max_context=40960,
        # 94 layers x 128 experts x 3 x 4096 x 1536 (config.json)
        experts=128, experts_per_token=8, expert_parameters=227.1e9,
    ),
    "deepseek-v3": ModelShape(
        name="deepseek-v3", hf_name="deepseek-ai/DeepSeek-V3",
        parameters=671e9, active_parameters=37e9, layers=61, hidden_size=7168,
        attention_heads=128, kv_heads=128, head_dim=192, v_head_dim=128,
        kv_lora_rank=512, qk_rope_head_dim=64, weight_dtype="fp8", max_context=163840,
        # 58 MoE layers x 256 experts x 3 x 7168 x 2048 (config.json)
        experts=256, experts_per_token=8, expert_parameters=653.9e9,
    ),
}

_ALIASES = {shape.hf_name.lower(): key for key, shape in BUILTIN_MODELS.items()}


def builtin_model(name: str) -> ModelShape:
    """A built-in model by short name (llama-3.1-70b) or Hugging Face id (meta-llama/Llama-3.1-70B-Instruct)."""
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in BUILTIN_MODELS:
        raise ModelConfigError(
            f"unknown model {name!r}; built-in: {', '.join(sorted(BUILTIN_MODELS))} "
            "(or pass a Hugging Face config.json)"
        )
    return BUILTIN_MODELS[key]


def _expert_counts(cfg: dict[str, Any]) -> tuple[int, int, float]:
    """Routed experts per layer, experts per token and the routed experts' parameters (0s: dense)."""
    experts = int(cfg.get("n_routed_experts") or cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
    if not experts:
        return 0, 0, 0.0
    hidden = int(cfg["hidden_size"])
    expert_size = 3 * hidden * int(cfg.get("moe_intermediate_size", cfg.get("intermediate_size", 4 * hidden)))
    moe_layers = int(cfg["num_hidden_layers"]) - int(cfg.get("first_k_dense_replace", 0))
    return experts, int(cfg.get("num_experts_per_tok", 2)), float(moe_layers * experts * expert_size)


def _count_parameters(cfg: dict[str, Any]) -> tuple[float, float]:
    """Total and active parameters estimated from a config (embeddings, attention, dense or MoE MLP)."""
    hidden = int(cfg["hidden_size"])
    layers = int(cfg["num_hidden_layers"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads", heads))
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    vocab = int(cfg.get("vocab_size", 32000))
    embeddings = vocab * hidden * (1 if cfg.get("tie_word_embeddings") else 2)
    if cfg.get("kv_lora_rank"):
        q_rank = int(cfg.get("q_lora_rank") or 0)
        qk_dim = int(cfg.get("qk_nope_head_dim", 128)) + int(cfg.get("qk_rope_head_dim", 64))
        v_dim = int(cfg.get("v_head_dim", 128))
        kv_rank = int(cfg["kv_lora_rank"])
        rope = int(cfg.get("qk_rope_head_dim", 64))
        q_proj = (hidden * q_rank + q_rank * heads * qk_dim) if q_rank else hidden * heads * qk_dim
        attention = q_proj + hidden * (kv_rank + rope) + kv_rank * heads * (qk_dim - rope + v_dim)
        attention += heads * v_dim * hidden
    else:
        attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    intermediate = int(cfg.get("intermediate_size", 4 * hidden))
    experts = int(cfg.get("n_routed_experts") or cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
    if experts:
        per_token = int(cfg.get("num_experts_per_tok", 2))
        expert_size = 3 * hidden * int(cfg.get("moe_intermediate_size", intermediate))
        shared = int(cfg.get("n_shared_experts") or 0)
        dense_layers = int(cfg.get("first_k_dense_replace", 0))
        moe_layers = layers - dense_layers
        dense_mlp = 3 * hidden * intermediate
        total_mlp = dense_layers * dense_mlp + moe_layers * (experts + shared) * expert_size
        active_mlp = dense_layers * dense_mlp + moe_layers * (per_token + shared) * expert_size
    else:
        total_mlp = active_mlp = layers * 3 * hidden * intermediate
    total = embeddings + layers * attention + total_mlp
    active = embeddings + layers * attention + active_mlp
    return float(total), float(active)


def from_hf_config(
    path: Path | str, *, weight_dtype: str | None = None, kv_dtype: str | None = None
) -> ModelShape:
    """A model from a Hugging Face style config.json (parameter counts estimated from the shapes)."""
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelConfigError(f"model config {path}: {error}") from None
    if not isinstance(cfg, dict):
        raise ModelConfigError(f"model config {path}: expected a JSON object")
    if "text_config" in cfg and "hidden_size" not in cfg:
        cfg = cfg["text_config"]
    for required in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
        if required not in cfg:
            raise ModelConfigError(f"model config {path}: missing field {required!r}")
    total, active = _count_parameters(cfg)
    experts, per_token, expert_parameters = _expert_counts(cfg)
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    torch_dtype = str(cfg.get("torch_dtype", "bfloat16"))
    default_weight = {"float16": "fp16", "float32": "bf16"}.get(torch_dtype, "bf16")
    quant = cfg.get("quantization_config") or {}
    if isinstance(quant, dict) and "fp8" in str(quant.get("quant_method", "")).lower():
        default_weight = "fp8"
    if cfg.get("kv_lora_rank"):
        qk_head = int(cfg.get("qk_nope_head_dim", 128)) + int(cfg.get("qk_rope_head_dim", 64))
        shape = ModelShape(
            name=str(cfg.get("_name_or_path") or Path(path).parent.name or "custom"),
            parameters=total, active_parameters=active, layers=int(cfg["num_hidden_layers"]),
            hidden_size=hidden, attention_heads=heads, kv_heads=heads, head_dim=qk_head,
            v_head_dim=int(cfg.get("v_head_dim", 128)), kv_lora_rank=int(cfg["kv_lora_rank"]),
            qk_rope_head_dim=int(cfg.get("qk_rope_head_dim", 64)), weight_dtype=default_weight,
            max_context=int(cfg.get("max_position_embeddings", 131072)),
        )
    else:
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        shape = ModelShape(
            name=str(cfg.get("_name_or_path") or Path(path).parent.name or "custom"),
            parameters=total, active_parameters=active, layers=int(cfg["num_hidden_layers"]),
            hidden_size=hidden, attention_heads=heads, kv_heads=int(cfg.get("num_key_value_heads", heads)),
            head_dim=head_dim, v_head_dim=head_dim, weight_dtype=default_weight,
            max_context=int(cfg.get("max_position_embeddings", 131072)),
        )
    shape = replace(shape, experts=experts, experts_per_token=per_token, expert_parameters=expert_parameters)
    return shape.with_dtypes(weight_dtype, kv_dtype)


def from_architecture(architecture: ModelArchitecture, name: str = "") -> ModelShape:
    """The capacity model's view of `spec.model.architecture`.

    The API does not carry the hidden size or the number of query heads; a built-in model with the same
    layer count, KV heads and head size lends its exact values, otherwise they are estimated from the
    parameter count (a transformer layer holds about 12 x hidden^2 parameters), which only affects the
    attention term of long prompts and the tensor-parallel traffic.
    """
    active = architecture.active_parameters or architecture.parameters
    for shape in BUILTIN_MODELS.values():
        same_name = bool(name) and name.lower() in (shape.name, shape.hf_name.lower())
        same_geometry = (
            shape.layers == architecture.layers
            and shape.kv_heads == architecture.kv_heads
            and shape.head_dim == architecture.head_dim
            and abs(shape.parameters - architecture.parameters) <= 0.05 * shape.parameters
        )
        if same_name or same_geometry:
            return replace(
                shape,
                name=name or shape.name,
                parameters=architecture.parameters,
                active_parameters=active,
                layers=architecture.layers,
                kv_heads=architecture.kv_heads,
                kv_lora_rank=architecture.kv_lora_rank or shape.kv_lora_rank,
                weight_dtype=architecture.weight_dtype,
                kv_dtype=architecture.kv_dtype,
            )
    dense_share = min(active, architecture.parameters)
    hidden = max(architecture.head_dim, int(math.sqrt(dense_share / (12.0 * architecture.layers))))
    heads = max(architecture.kv_heads, round(hidden / architecture.head_dim))
    return ModelShape(
        name=name or "custom",
        parameters=architecture.parameters,
        active_parameters=active,
        layers=architecture.layers,
        hidden_size=hidden,
        attention_heads=heads,
        kv_heads=architecture.kv_heads,
        head_dim=architecture.head_dim,
        v_head_dim=architecture.head_dim,
        kv_lora_rank=architecture.kv_lora_rank,
        qk_rope_head_dim=64 if architecture.kv_lora_rank else 0,
        weight_dtype=architecture.weight_dtype,
        kv_dtype=architecture.kv_dtype,
    )


def to_architecture(shape: ModelShape) -> ModelArchitecture:
    """The API's `spec.model.architecture` for a model shape (for emitted manifests)."""
    weight = shape.weight_dtype if shape.weight_dtype != "fp32" else "bf16"
    return ModelArchitecture.model_validate(
        {
            "parameters": shape.parameters,
            "activeParameters": shape.active_parameters if shape.is_moe else None,
            "layers": shape.layers,
            "kvHeads": shape.kv_heads,
            "headDim": shape.head_dim,
            "kvLoraRank": shape.kv_lora_rank,
            "weightDtype": weight,
            "kvDtype": shape.kv_dtype,
            "attentionHeads": shape.attention_heads,
            "experts": shape.experts or None,
        }
    )
