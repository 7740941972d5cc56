"""The Qwen-VL language model as a megatron-core ``GPTModel``.

Qwen2.5-VL's decoder is a Qwen2 decoder: RMSNorm (pre-norm), grouped-query attention with a
bias on Q, K and V only, SwiGLU MLP without biases, untied (7B+) or tied (3B) embeddings, and
multimodal RoPE whose rotary frequencies are split into (temporal, height, width) sections.
megatron-core 0.16 builds all of it: ``position_embedding_type="mrope"`` with
``mrope_section`` computes the same cos/sin layout as transformers (sections taken from the
T/H/W position rows in turn, then duplicated for the two rotary halves).

Qwen3-VL (interleaved M-RoPE, Q/K norms, deepstack visual features added inside the first
decoder layers) is not built here: :func:`lm_spec` rejects it with a clear message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

SUPPORTED_MODEL_TYPES = ("qwen2_5_vl",)


@dataclass(frozen=True)
class LMSpec:
    """Shape of the decoder, read from the HF ``text_config``."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    rms_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    tied_embeddings: bool
    max_positions: int

    def check_parallel(self, tp: int, pp: int) -> None:
        problems = []
        if self.num_kv_heads % tp:
            problems.append(f"num_key_value_heads={self.num_kv_heads} is not a multiple of "
                            f"tensor_parallel={tp}")
        if self.ffn_hidden_size % tp:
            problems.append(f"intermediate_size={self.ffn_hidden_size} is not a multiple of "
                            f"tensor_parallel={tp}")
        if self.num_layers % pp:
            problems.append(f"num_hidden_layers={self.num_layers} is not a multiple of "
                            f"pipeline_parallel={pp}")
        if problems:
            raise ValueError("cannot split the language model: " + "; ".join(problems))

    def padded_vocab(self, tp: int) -> int:
        """Vocabulary rows rounded up to a multiple of ``tp`` (vocab-parallel layers split
        rows evenly); the extra rows are zero and their logits are masked out."""
        return -(-self.vocab_size // tp) * tp


def lm_spec(hf_config: Any) -> LMSpec:
    """Decoder shape of a Qwen-VL ``config`` (transformers object)."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"train.backend=megatron supports model types "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}, got {model_type!r}; use "
                         "train.backend=hf for this model")
    text = hf_config.text_config
    rope = dict(getattr(text, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type={rope.get('rope_type')!r} is not supported by the "
                         "megatron backend")
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    section = tuple(int(s) for s in rope.get("mrope_section", (16, 24, 24)))
    if len(section) != 3 or sum(section) != head_dim // 2:
        raise ValueError(f"mrope_section {section} must have 3 entries summing to "
                         f"head_dim / 2 = {head_dim // 2}")
    if getattr(text, "use_sliding_window", False):
        raise ValueError("sliding-window attention is not supported by the megatron backend")
    return LMSpec(
        num_layers=text.num_hidden_layers, hidden_size=text.hidden_size,
        num_heads=text.num_attention_heads, num_kv_heads=text.num_key_value_heads,
        head_dim=head_dim, ffn_hidden_size=text.intermediate_size, vocab_size=text.vocab_size,
        rms_eps=float(text.rms_norm_eps), rope_theta=float(rope.get("rope_theta", 1e6)),
        mrope_section=section,  # type: ignore[arg-type]
        tied_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        max_positions=int(text.max_position_embeddings))


def transformer_engine_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def transformer_config(spec: LMSpec, tp: int, pp: int, dtype: torch.dtype) -> Any:
    from megatron.core.transformer import TransformerConfig

    spec.check_parallel(tp, pp)
    return TransformerConfig(
        num_layers=spec.num_layers, hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_heads, num_query_groups=spec.num_kv_heads,
        kv_channels=spec.head_dim, ffn_hidden_size=spec.ffn_hidden_size,
        normalization="RMSNorm", layernorm_epsilon=spec.rms_eps,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        add_qkv_bias=True, mrope_section=list(spec.mrope_section),
        # RL log-probs must be deterministic functions of the weights: no dropout.
        hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, pipeline_dtype=dtype,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        # Weights always come from an HF folder: skip the random init, allocate on the host
        # so that loading never needs the full model on one GPU.
        perform_initialization=False, use_cpu_initialization=True,
        # Unfused paths: they exist on CPU and agree with transformers to float rounding.
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True, sequence_parallel=False)


def layer_spec(use_te: bool) -> Any:
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")


def build_gpt(spec: LMSpec, config: Any, *, tp: int, first_stage: bool, last_stage: bool,
              use_te: bool) -> Any:
    """This rank's slice of the decoder (all of it at PP=1) as a ``GPTModel``.

    With pipeline parallelism and tied embeddings the last stage gets its own output matrix
    (a copy of the embedding, kept equal by summing the two gradients), as in Megatron.
    """
    from megatron.core.models.gpt import GPTModel

    return GPTModel(
        config=config, transformer_layer_spec=layer_spec(use_te),
        vocab_size=spec.padded_vocab(tp), max_sequence_length=spec.max_positions,
        pre_process=first_stage, post_process=last_stage, parallel_output=True,
        share_embeddings_and_output_weights=spec.tied_embeddings and first_stage
        and last_stage,
        position_embedding_type="mrope", rotary_base=int(spec.rope_theta))
