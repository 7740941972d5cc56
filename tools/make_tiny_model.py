"""Build a tiny random-init Qwen-VL model folder for CPU runs and tests (no model hub needed).

    python tools/make_tiny_model.py --out runs/tiny-model --corpus data/train.jsonl
    python tools/make_tiny_model.py --out runs/tiny-qwen3 --corpus a.jsonl b.jsonl \\
        --family qwen3_vl --size hidden_size=256 --size num_layers=4

The tokenizer is trained on the problems, options and solutions of the given sample JSONL
files plus the answer-format vocabulary; the folder loads with ``from_pretrained``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from evr1.models.tiny import FAMILIES, SHAPES, TinySizes, build_tiny_model, corpus_from_jsonl


def _parse_size(item: str) -> tuple[str, Any]:
    key, sep, value = item.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--size {item!r} is not KEY=VALUE")
    return key, yaml.safe_load(value)


def _summary(out: Path) -> str:
    from evr1.models.loading import load_model, load_processor

    processor = load_processor(out)
    model = load_model(out, "float32", "cpu")
    tokenizer = processor.tokenizer
    params = sum(p.numel() for p in model.parameters())
    answer = len(tokenizer("<answer>B</answer>").input_ids)
    return (f"wrote {out}: {type(model).__name__}, {params / 1e6:.2f}M parameters, "
            f"tokenizer {len(tokenizer)} tokens, '<answer>B</answer>' = {answer} tokens")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder to write")
    parser.add_argument("--corpus", nargs="+", default=[], metavar="JSONL",
                        help="sample JSONL files whose text trains the tokenizer")
    parser.add_argument("--family", choices=FAMILIES, default="qwen2_5_vl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", choices=SHAPES, default="tiny",
                        help="a named shape (qwen2_5_vl_1b: ~1.2B, realistic, for GPU timings)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype of the saved weights")
    parser.add_argument("--size", action="append", type=_parse_size, default=[],
                        metavar="KEY=VALUE",
                        help=f"override a size ({', '.join(TinySizes.__dataclass_fields__)})")
    args = parser.parse_args(argv)
    missing = [p for p in args.corpus if not Path(p).is_file()]
    if missing:
        parser.error(f"corpus file not found: {', '.join(missing)}")
    corpus = corpus_from_jsonl(args.corpus)
    try:
        out = build_tiny_model(args.out, corpus, family=args.family, seed=args.seed,
                               shape=args.shape, dtype=args.dtype, **dict(args.size))
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    print(f"tokenizer corpus: {len(corpus)} texts from {len(args.corpus)} file(s)")
    print(_summary(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
