"""The Qwen-VL language model as a megatron-core ``GPTModel``.

Qwen2.5-VL's decoder is a Qwen2 decoder: RMSNorm (pre-norm), grouped-query attention with a
bias on Q, K and V only, SwiGLU MLP without biases, untied (7B+) or tied (3B) embeddings, and
multimodal RoPE whose rotary frequencies are split into (temporal, height, width) sections.
megatron-core (0.16 to 0.19) builds all of it: ``position_embedding_type="mrope"`` with
``mrope_section`` computes the same cos/sin layout as transformers (sections taken from the
T/H/W position rows in turn, then duplicated for the two rotary halves).

Qwen3-VL (dense) differs in four places, three of them built here:

* Q and K are RMS-normalised per head before the rotation (``qk_layernorm=True``: the
  spec's ``q_layernorm`` / ``k_layernorm``), and Q, K, V have no bias;
* ``head_dim`` is explicit (not ``hidden_size / heads``): it is ``kv_channels``;
* the M-RoPE sections are *interleaved* (frequency j takes its position from the T, H or W
  row by ``j % 3`` while the H and W sections last, from T after them; see
  :class:`InterleavedMRoPE`), which megatron-core (0.16 to 0.19) does not
  compute (its ``rotary_interleaved`` is a different thing: the GPT-J pairing of channels):
  :func:`build_gpt` swaps in a module that does, with megatron's call signature;
* deepstack (vision features added to the hidden states after the first few decoder layers)
  is not part of the ``GPTModel``: :mod:`.deepstack` hooks it onto the layers.

Mixture-of-experts models (``qwen3_vl_moe``) are not built: :func:`lm_spec` rejects them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

SUPPORTED_MODEL_TYPES = ("qwen2_5_vl", "qwen3_vl")


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
    qkv_bias: bool  # Qwen2.5-VL: bias on Q, K, V; Qwen3-VL: none
    qk_norm: bool  # Qwen3-VL: RMSNorm over head_dim on Q and K
    mrope_interleaved: bool  # Qwen3-VL: T/H/W frequencies interleaved, not in blocks
    deepstack_layers: int  # Qwen3-VL: decoder layers 0..n-1 get vision features added

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


# transformers' defaults when a config leaves ``mrope_section`` out.
_DEFAULT_MROPE_SECTION = {"qwen2_5_vl": (16, 24, 24), "qwen3_vl": (24, 20, 20)}


def lm_spec(hf_config: Any) -> LMSpec:
    """Decoder shape of a Qwen-VL ``config`` (transformers object)."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"train.backend=megatron supports model types "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)} (dense decoders only), got "
                         f"{model_type!r}; use train.backend=hf for this model")
    qwen3 = model_type == "qwen3_vl"
    text = hf_config.text_config
    rope = dict(getattr(text, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type={rope.get('rope_type')!r} is not supported by the "
                         "megatron backend")
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    section = tuple(int(s) for s in rope.get("mrope_section", _DEFAULT_MROPE_SECTION[model_type]))
    if len(section) != 3 or sum(section) != head_dim // 2:
        raise ValueError(f"mrope_section {section} must have 3 entries summing to "
                         f"head_dim / 2 = {head_dim // 2}")
    if getattr(text, "use_sliding_window", False):
        raise ValueError("sliding-window attention is not supported by the megatron backend")
    if qwen3 and getattr(text, "attention_bias", False):
        # Megatron's add_qkv_bias covers Q, K, V; Qwen3's flag would also bias o_proj.
        raise ValueError("attention_bias=true is not supported by the megatron backend")
    return LMSpec(
        num_layers=text.num_hidden_layers, hidden_size=text.hidden_size,
        num_heads=text.num_attention_heads, num_kv_heads=text.num_key_value_heads,
        head_dim=head_dim, ffn_hidden_size=text.intermediate_size, vocab_size=text.vocab_size,
        rms_eps=float(text.rms_norm_eps), rope_theta=float(rope.get("rope_theta", 1e6)),
        mrope_section=section,  # type: ignore[arg-type]
        tied_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        max_positions=int(text.max_position_embeddings),
        # transformers' Qwen3-VL interleaves whatever rope_parameters["mrope_interleaved"]
        # says (released configs set it to true).
        qkv_bias=not qwen3, qk_norm=qwen3, mrope_interleaved=qwen3,
        deepstack_layers=len(hf_config.vision_config.deepstack_visual_indexes) if qwen3 else 0)


def transformer_engine_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def transformer_config(spec: LMSpec, tp: int, pp: int, dtype: torch.dtype) -> Any:
    # heavy: megatron-core is imported only when the megatron backend runs
    from megatron.core.transformer import TransformerConfig

    spec.check_parallel(tp, pp)
    return TransformerConfig(
        num_layers=spec.num_layers, hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_heads, num_query_groups=spec.num_kv_heads,
        kv_channels=spec.head_dim, ffn_hidden_size=spec.ffn_hidden_size,
        normalization="RMSNorm", layernorm_epsilon=spec.rms_eps,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias, qk_layernorm=spec.qk_norm,
        mrope_section=list(spec.mrope_section),
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


def layer_spec(use_te: bool, qk_norm: bool) -> Any:
    # heavy: megatron-core is imported only when the megatron backend runs
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_norm)
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm",
                                                    qk_layernorm=qk_norm)


def build_gpt(spec: LMSpec, config: Any, *, tp: int, first_stage: bool, last_stage: bool,
              use_te: bool) -> Any:
    """This rank's slice of the decoder (all of it at PP=1) as a ``GPTModel``.

    With pipeline parallelism and tied embeddings the last stage gets its own output matrix
    (a copy of the embedding, kept equal by summing the two gradients), as in Megatron.
    Interleaved M-RoPE (Qwen3-VL) replaces megatron's rotary module by
    :class:`InterleavedMRoPE`.
    """
    # heavy: megatron-core is imported only when the megatron backend runs
    from megatron.core.models.gpt import GPTModel

    gpt = GPTModel(
        config=config, transformer_layer_spec=layer_spec(use_te, spec.qk_norm),
        vocab_size=spec.padded_vocab(tp), max_sequence_length=spec.max_positions,
        pre_process=first_stage, post_process=last_stage, parallel_output=True,
        share_embeddings_and_output_weights=spec.tied_embeddings and first_stage
        and last_stage,
        position_embedding_type="mrope", rotary_base=int(spec.rope_theta))
    if spec.mrope_interleaved:
        gpt.rotary_pos_emb = InterleavedMRoPE(spec.head_dim, spec.rope_theta)
    return gpt


class InterleavedMRoPE(torch.nn.Module):
    """Rotary angles of Qwen3-VL's interleaved M-RoPE, as transformers computes them.

    transformers (``Qwen3VLTextRotaryEmbedding``) takes frequency j of the ``head_dim / 2``
    from the temporal position row, except j = 1, 4, 7, ... below ``3 * section[1]`` (height
    row) and j = 2, 5, 8, ... below ``3 * section[2]`` (width row); the two rotary halves share
    the frequencies. Same call signature and output as megatron-core's
    ``MultimodalRotaryEmbedding``: ``(position_ids [3, B, S], mrope_section) -> angles
    [S, B, 1, head_dim]`` (megatron applies cos/sin to them), so ``GPTModel`` uses it unchanged.
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        # Exactly transformers' expression (a float base), so the angles agree bit for bit.
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: Tensor, mrope_section: list[int],
                cp_group: Any = None) -> Tensor:
        if cp_group is not None and cp_group.size() > 1:
            raise NotImplementedError("context parallelism is not supported with interleaved "
                                      "M-RoPE")
        freqs = position_ids[..., None].float() * self.inv_freq.to(position_ids.device)
        angles = freqs[0].clone()  # [B, S, head_dim / 2], temporal everywhere to start with
        for row in (1, 2):  # height, width
            picked = slice(row, 3 * mrope_section[row], 3)
            angles[..., picked] = freqs[row, ..., picked]
        angles = torch.cat((angles, angles), dim=-1)
        return angles.transpose(0, 1)[:, :, None, :].contiguous()
