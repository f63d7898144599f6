"""Model hyper-parameters of the decoder families we host: Llama (Llama 2/3, SmolLM), Mistral, Qwen2,
Qwen3, Qwen3-MoE and Mixtral (mixtures of experts) and Gemma 3 (text).

One frozen dataclass, read from a Hugging Face ``config.json``; the per-family rules are
:func:`family_fields`. Both the
transformers 4.x layout (``rope_theta`` + ``rope_scaling``) and the 5.x layout
(``rope_parameters``) are accepted. Anything our block code would compute
differently from the reference is rejected here, with a message naming it,
rather than silently producing wrong numbers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SUPPORTED_MODEL_TYPES", "ModelConfig", "RopeScaling", "family_fields"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "gemma3_text")
LAYER_TYPES = ("full_attention", "sliding_attention")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")

# RoPE variants whose frequencies we compute; "dynamic", "yarn", "longrope" change
# the frequencies with sequence length or scale cos/sin, so they are refused.
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """How rotary frequencies are stretched for long contexts (``rope_type`` names the rule).

    ``"default"`` leaves them alone, ``"linear"`` divides every frequency by
    ``factor``, and ``"llama3"`` divides only the low frequencies, blending
    smoothly between ``low_freq_factor`` and ``high_freq_factor`` wavelength
    thresholds measured against ``original_max_position_embeddings``.
    """

    rope_type: str  # "default" | "linear" | "llama3"
    factor: float = 1.0  # frequency divisor (linear, llama3)
    low_freq_factor: float = 1.0  # llama3: wavelengths above original_max / this are fully scaled
    high_freq_factor: float = 4.0  # llama3: wavelengths below original_max / this are untouched
    original_max_position_embeddings: int = 8192  # llama3: context length the model was trained on

    def __post_init__(self) -> None:
        if self.rope_type not in _ROPE_TYPES:
            raise ValueError(f"unsupported rope_type {self.rope_type!r}; supported: {', '.join(_ROPE_TYPES)}")
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor must be positive, got {self.factor}")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError("llama3 rope scaling needs high_freq_factor > low_freq_factor")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder, enough to build and load any slice of it.

    Construct it with :meth:`from_pretrained` (a folder with ``config.json``) or
    :meth:`from_hf_dict`; both raise ``ValueError`` naming the first feature we
    do not implement. Instances are immutable and hashable, so they can key
    caches and travel between threads.
    """

    vocab_size: int  # rows of the embedding and of the LM head
    hidden_size: int  # width of the residual stream
    intermediate_size: int  # width of the SwiGLU MLP
    num_layers: int  # number of transformer blocks in the whole model
    num_heads: int  # query heads per block
    num_kv_heads: int  # key/value heads per block (< num_heads: grouped-query attention)
    head_dim: int  # width of one attention head (not always hidden_size // num_heads)
    rms_norm_eps: float = 1e-5  # epsilon inside every RMSNorm
    rope_theta: float = 10000.0  # RoPE base: frequency i is theta ** (-2i / head_dim)
    rope_scaling: RopeScaling | None = None  # long-context frequency scaling, None = plain RoPE
    max_position_embeddings: int = 2048  # context length the model was configured for (a hint)
    qkv_bias: bool = False  # q/k/v projections have a bias (Qwen2; Llama with attention_bias)
    o_bias: bool = False  # output projection has a bias (only Llama with attention_bias=True)
    mlp_bias: bool = False  # gate/up/down projections have a bias
    tie_word_embeddings: bool = False  # lm_head shares the embedding matrix
    bos_token_id: int | None = None  # beginning-of-sequence token, if the model has one
    eos_token_ids: tuple[int, ...] = ()  # any of these ends generation
    model_type: str = "llama"  # "llama" | "mistral" | "qwen2"
    torch_dtype: str = "float32"  # dtype the checkpoint was saved in; a hint, loading may convert
    # Mistral/Qwen2 sliding-window attention. Within the window it equals full attention,
    # so we support it exactly for sequences of at most this many tokens and refuse longer
    # ones (Stage checks cache and sequence lengths). None = no window.
    sliding_window: int | None = None
    hidden_act: str = "silu"  # MLP gate activation: "silu" (SwiGLU) or "gelu_pytorch_tanh" (Gemma's GeGLU)
    qk_norm: bool = False  # an RMSNorm over each head of q and k before RoPE (Qwen3, Gemma 3)
    # Gemma's conventions: norms scale by (1 + weight) in float32 before the cast, "sandwich" norms
    # after attention and around the MLP, and embeddings multiplied by sqrt(hidden_size)
    gemma_norms: bool = False
    attention_scale: float | None = None  # softmax scale of q.k; None = head_dim ** -0.5
    # per block "full_attention" or "sliding_attention" (attends to the last sliding_window keys
    # only, masked exactly); () = the older models above: every block full, a window refused beyond it
    layer_types: tuple[str, ...] = ()
    local_rope_theta: float | None = None  # RoPE base of sliding blocks (Gemma 3; plain RoPE there)
    num_experts: int = 0  # mixture of experts (Mixtral, Qwen3-MoE): expert MLPs per block; 0 = one dense MLP
    experts_per_token: int = 0  # top-k experts each token is routed to
    moe_intermediate_size: int = 0  # width of one expert's MLP; 0 = intermediate_size (Mixtral)
    moe_renormalize: bool = True  # the k routing weights are rescaled to sum to 1 (Qwen3-MoE: norm_topk_prob)
    dense_layers: tuple[int, ...] = ()  # blocks of a mixture-of-experts model that keep a dense MLP
    moe_every: int = 1  # every n-th block (counting from 1) has experts (Qwen3-MoE's decoder_sparse_step)
    final_logit_softcap: float | None = None  # logits = cap * tanh(logits / cap) (Gemma); None = none

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a positive multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim <= 0 or self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be a positive even number (RoPE rotates pairs), got {self.head_dim}")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive or None, got {self.sliding_window}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; supported: {', '.join(ACTIVATIONS)}")
        if self.layer_types:
            if len(self.layer_types) != self.num_layers or any(t not in LAYER_TYPES for t in self.layer_types):
                raise ValueError(f"layer_types must name one of {LAYER_TYPES} for each of {self.num_layers} blocks")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("sliding_attention blocks need a sliding_window")
        if self.num_experts < 0 or not 0 <= self.experts_per_token <= self.num_experts:
            raise ValueError(
                f"experts_per_token ({self.experts_per_token}) must lie in [1, num_experts ({self.num_experts})]"
            )
        if self.num_experts and not self.experts_per_token:
            raise ValueError("a mixture of experts needs experts_per_token >= 1")

    def is_moe(self, layer_index: int) -> bool:
        """Whether block ``layer_index`` routes tokens to experts rather than one dense MLP."""
        return (
            self.num_experts > 0
            and layer_index not in self.dense_layers
            and (layer_index + 1) % max(self.moe_every, 1) == 0
        )

    def is_sliding(self, layer_index: int) -> bool:
        """Whether block ``layer_index`` attends only to the last ``sliding_window`` keys (masked)."""
        return bool(self.layer_types) and self.layer_types[layer_index] == "sliding_attention"

    @property
    def num_queries_per_kv(self) -> int:
        """Query heads that share one key/value head (1 for plain multi-head attention)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        """Read ``config.json`` from a Hugging Face model folder (or the file itself)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {file}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{file} does not hold a JSON object")
        return cls.from_hf_dict(data)

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Build a config from the dict of a Hugging Face ``config.json``, refusing what we cannot run.

        Unknown keys are ignored (configs carry many training-only fields). Known
        keys with values we do not implement (another model type, activation,
        RoPE variant, per-layer attention types, ...) raise ``ValueError``.
        """
        model_type = str(d.get("model_type", ""))
        if model_type not in SUPPORTED_MODEL_TYPES:
            hint = " (multimodal: use its text-only gemma3_text checkpoint)" if model_type == "gemma3" else ""
            raise ValueError(
                f"unsupported model_type {model_type!r}{hint}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        hidden_size = int(d["hidden_size"])
        num_heads = int(d["num_attention_heads"])
        eos = d.get("eos_token_id")
        if eos is None:
            eos_ids: tuple[int, ...] = ()
        elif isinstance(eos, list | tuple):
            eos_ids = tuple(int(e) for e in eos)
        else:
            eos_ids = (int(eos),)
        bos = d.get("bos_token_id")
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden_size,
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
            head_dim=int(d.get("head_dim") or hidden_size // num_heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=eos_ids,
            model_type=model_type,
            torch_dtype=str(d.get("dtype") or d.get("torch_dtype") or "float32"),
            **family_fields(d, model_type),
        )


def _parse_rope(d: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """Return (theta, scaling) from either config layout, refusing RoPE variants we do not implement."""
    # transformers 5.x: one "rope_parameters" dict holding theta and the scaling rule.
    # transformers 4.x: top-level "rope_theta" plus an optional "rope_scaling" dict whose
    # rule is named by "rope_type" (newer) or "type" (older).
    params = d.get("rope_parameters")
    if params is not None:
        if not isinstance(params, Mapping) or any(isinstance(v, Mapping) for v in params.values()):
            raise ValueError("unsupported rope_parameters: per-layer-type RoPE settings are not implemented")
        theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
        scaling: Mapping[str, Any] | None = params
    else:
        theta = float(d.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling")
    if scaling is None:
        return theta, None
    rope_type = str(scaling.get("rope_type") or scaling.get("type") or "default")
    if rope_type not in _ROPE_TYPES:
        raise ValueError(f"unsupported rope scaling type {rope_type!r}; supported: {', '.join(_ROPE_TYPES)}")
    if scaling.get("attention_factor") not in (None, 1, 1.0):
        raise ValueError("unsupported rope scaling: attention_factor != 1 is not implemented")
    if rope_type == "default":
        return theta, None
    if "factor" not in scaling:
        raise ValueError(f"rope scaling {rope_type!r} needs a 'factor'")
    if rope_type == "linear":
        return theta, RopeScaling("linear", factor=float(scaling["factor"]))
    try:
        return theta, RopeScaling(
            "llama3",
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    except KeyError as exc:
        raise ValueError(f"llama3 rope scaling is missing {exc.args[0]!r}") from None


def _parse_sliding_window(d: Mapping[str, Any], model_type: str) -> int | None:
    """The attention window in tokens, or None when every layer attends to the whole prefix."""
    layer_types = d.get("layer_types")
    if layer_types is not None and any(t not in ("full_attention", "sliding_attention") for t in layer_types):
        raise ValueError(f"unsupported layer_types {sorted(set(layer_types))}")
    if model_type == "qwen2":
        # Qwen2 ships a sliding_window value but only uses it when use_sliding_window is set.
        uses_window = bool(d.get("use_sliding_window", False)) or (
            layer_types is not None and "sliding_attention" in layer_types
        )
        if not uses_window:
            return None
    window = d.get("sliding_window")
    if window is None:
        return None
    return int(window)


def family_fields(d: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    """The :class:`ModelConfig` fields in which the families differ, from a ``config.json`` dict.

    Refuses (ValueError naming it) any feature of a family that our blocks would compute differently.
    """
    if model_type == "gemma3_text":
        return _gemma3_fields(d)
    hidden_act = d.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise ValueError(f"unsupported hidden_act {hidden_act!r}; only 'silu' (SwiGLU) is implemented for {model_type}")
    rope_theta, rope_scaling = _parse_rope(d)
    fields: dict[str, Any] = {"rope_theta": rope_theta, "rope_scaling": rope_scaling}
    # Llama's attention_bias puts a bias on all four projections; Qwen2 always has q/k/v biases and
    # never an o_proj bias (its config has no attention_bias key).
    if model_type == "qwen2":
        fields["qkv_bias"], fields["o_bias"] = True, False
    else:
        fields["qkv_bias"] = fields["o_bias"] = bool(d.get("attention_bias", False))
    if model_type in ("qwen3", "qwen3_moe"):
        fields["qk_norm"] = True
        fields.update(_layer_windows(d, uses_window=bool(d.get("use_sliding_window", False))))
        if model_type == "qwen3_moe":
            # released checkpoints say num_experts; transformers 5 saves it as num_local_experts
            fields["num_experts"] = int(d["num_experts"] if "num_experts" in d else d["num_local_experts"])
            fields["experts_per_token"] = int(d["num_experts_per_tok"])
            fields["moe_intermediate_size"] = int(d["moe_intermediate_size"])
            fields["moe_renormalize"] = bool(d.get("norm_topk_prob", False))
            fields["dense_layers"] = tuple(int(i) for i in d.get("mlp_only_layers") or ())
            fields["moe_every"] = int(d.get("decoder_sparse_step", 1))
        return fields
    fields["sliding_window"] = _parse_sliding_window(d, model_type)
    if model_type == "mixtral":
        fields["num_experts"] = int(d["num_local_experts"])
        fields["experts_per_token"] = int(d["num_experts_per_tok"])
    return fields


def _layer_windows(d: Mapping[str, Any], *, uses_window: bool) -> dict[str, Any]:
    """``layer_types`` and ``sliding_window`` of a family that masks sliding blocks exactly."""
    num_layers = int(d["num_hidden_layers"])
    layer_types = tuple(d.get("layer_types") or ("full_attention",) * num_layers)
    if any(t not in LAYER_TYPES for t in layer_types):
        raise ValueError(f"unsupported layer_types {sorted(set(layer_types))}")
    window = d.get("sliding_window")
    if not uses_window or window is None:
        return {"layer_types": ("full_attention",) * num_layers, "sliding_window": None}
    return {"layer_types": layer_types, "sliding_window": int(window)}


def _gemma3_fields(d: Mapping[str, Any]) -> dict[str, Any]:
    """Gemma 3 (text): GeGLU, (1 + w) sandwich norms, q/k norms, interleaved local/global attention."""
    hidden_act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    if hidden_act != "gelu_pytorch_tanh":
        raise ValueError(f"unsupported hidden_activation {hidden_act!r}; gemma3 needs 'gelu_pytorch_tanh'")
    if d.get("attn_logit_softcapping") is not None:
        raise ValueError("unsupported attn_logit_softcapping: attention logit soft-capping is not implemented")
    if d.get("use_bidirectional_attention"):
        raise ValueError("unsupported use_bidirectional_attention: only causal attention is implemented")
    num_layers = int(d["num_hidden_layers"])
    if d.get("layer_types") is None:  # transformers 4.x: every sliding_window_pattern-th block is global
        pattern = int(d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6)
        d = {
            **d,
            "layer_types": [
                "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)
            ],
        }
    params = d.get("rope_parameters")
    if isinstance(params, Mapping) and "full_attention" in params:  # transformers 5.x: one dict per layer type
        global_theta, scaling = _parse_rope({"rope_parameters": params["full_attention"]})
        local = params.get("sliding_attention") or {}
        local_theta, local_scaling = _parse_rope({"rope_parameters": local})
        if local_scaling is not None:
            raise ValueError("unsupported rope_parameters: scaled RoPE on sliding_attention blocks")
        local_theta = float(local.get("rope_theta", 10000.0))
    else:
        global_theta, scaling = _parse_rope(d)
        local_theta = float(d.get("rope_local_base_freq", 10000.0))
    return {
        "hidden_act": "gelu_pytorch_tanh",
        "qk_norm": True,
        "gemma_norms": True,
        "qkv_bias": bool(d.get("attention_bias", False)),
        "o_bias": bool(d.get("attention_bias", False)),
        "attention_scale": float(d.get("query_pre_attn_scalar", 256)) ** -0.5,
        "rope_theta": global_theta,
        "rope_scaling": scaling,
        "local_rope_theta": local_theta,
        "final_logit_softcap": None
        if d.get("final_logit_softcapping") is None
        else float(d["final_logit_softcapping"]),
        **_layer_windows(d, uses_window=True),
    }
