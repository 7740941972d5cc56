"""A small Qwen-style tokenizer trained locally, for the tiny CPU models.

There is no model hub here, so the tiny models get a byte-level BPE tokenizer trained on the
task text. It uses the exact Qwen2 pre-tokenizer (regex split + byte-level, NFC) and is saved
as a ``Qwen2Tokenizer``, so it loads and behaves like a real Qwen-VL tokenizer, only smaller.

A tokenizer trained on a handful of prompts splits ``<answer>B</answer>`` into ~10 pieces and
a short response limit then never contains a complete answer (nothing can be rewarded). So the
answer tags are added tokens and the answer vocabulary is weighted into training until every
answer word is a single token.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

# Qwen's control tokens, in Qwen's own order (their ids follow the trained vocabulary).
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

# Format tags are ordinary (non-special) added tokens: decoding with skip_special_tokens=True
# must keep them, since the rewards read the answer out of the decoded text.
FORMAT_TOKENS = ("<answer>", "</answer>", "<think>", "</think>")

# Words answers are made of; each must end up a single token, with and without a leading space
# (digits excepted: the Qwen pre-tokenizer always splits " 7" into " " and "7").
ANSWER_WORDS = (
    *"ABCDEFGHIJ", *"0123456789",
    "yes", "no", "Yes", "No", "true", "false",
    "red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white",
    "gray", "grey", "cyan", "magenta",
    "left", "right", "up", "down", "forward", "backward", "clockwise", "counterclockwise",
    "north", "south", "east", "west", "still", "none",
)

# Words the chat template ("user\n") and Qwen3-VL's frame timestamps ("<1.2 seconds>") put
# into every prompt; weighted like the answer words so prompts stay short.
FRAMING_WORDS = ("system", "user", "assistant", "seconds")


def _empty_qwen_bpe() -> Tokenizer:
    """An untrained BPE with the same normalizer, pre-tokenizer and decoder as Qwen2."""
    tok = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                        fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _training_text(corpus: list[str]) -> Iterator[str]:
    yield from corpus
    # Repeat these words more often than any corpus line can be, so their merges win over the
    # corpus' own frequent words however large the corpus is.
    words = ANSWER_WORDS + FRAMING_WORDS
    line = " " + " ".join(words) + "\n" + "\n".join(words)
    for _ in range(max(64, len(corpus))):
        yield line


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 4096) -> Qwen2Tokenizer:
    """Train a byte-level BPE on ``corpus`` and wrap it as a Qwen2 tokenizer.

    ``vocab_size`` caps the BPE vocabulary (the trainer stops early on a small corpus); the
    special and format tokens come on top of it.
    """
    texts = [t for t in corpus if t]
    bpe = _empty_qwen_bpe()
    trainer = BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_training_text(texts), trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    # Control and format tokens get the ids right after the learned vocabulary, in Qwen's order
    # (<|endoftext|> first), instead of whatever order the wrapper would register them in.
    vocab = dict(model["vocab"])
    for token in SPECIAL_TOKENS + FORMAT_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None,
                               eos_token=IM_END, pad_token=ENDOFTEXT)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in FORMAT_TOKENS])
    return tokenizer


# A Qwen-style chat template (no default system message: shorter prompts on CPU). Image and
# video parts become one placeholder each; the processor expands it to the real token count.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'video' %}{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
