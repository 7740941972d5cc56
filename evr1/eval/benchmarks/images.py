"""Image benchmarks for joint image-video models: MMStar (and VLMEvalKit TSVs like it)."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from typing import Any

from evr1.data.schema import Sample
from evr1.eval.benchmarks.base import Benchmark, LoadContext, MetricSpec
from evr1.eval.benchmarks.common import records
from evr1.eval.formats import LETTERS, Record

# --------------------------------------------------------------------------- MMStar (images)


_IMAGE_MAGIC = ((b"\x89PNG", ".png"), (b"\xff\xd8", ".jpg"), (b"GIF8", ".gif"),
                (b"RIFF", ".webp"), (b"BM", ".bmp"))


def _image_bytes(value: Any) -> bytes | None:
    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, bytes):
        return value
    if isinstance(value, str) and len(value) > 64:
        try:
            return base64.b64decode(value, validate=False)
        except ValueError:
            return None
    return None


def _write_image(ctx: LoadContext, rec: Record, name: str) -> str:
    """The image embedded in the record, written once under ``ctx.media_out``; a record
    that names a file instead (``image_path`` or a short ``image``) is found under the root."""
    data = _image_bytes(rec.get("image", default=None))
    if data is None:
        return ctx.media.find(rec.text("image_path", "image"))
    if ctx.media_out is None:
        raise rec.fail("the image is embedded but no folder to write it to was given")
    suffix = next((s for magic, s in _IMAGE_MAGIC if data.startswith(magic)), ".png")
    ctx.media_out.mkdir(parents=True, exist_ok=True)
    target = ctx.media_out / f"{name}{suffix}"
    if not target.exists() or target.stat().st_size != len(data):
        target.write_bytes(data)
    return str(target)


_INLINE_OPTIONS = re.compile(r"\n?Options:\s*(.*)$", re.DOTALL)
_OPTION_ITEM = re.compile(r"([A-F]):\s*(.*?)(?=,\s*[A-F]:\s|$)", re.DOTALL)


# The hub's release (Lin-Chen/MMStar): mmstar.parquet, or its val split in the hub's shards;
# VLMEvalKit: MMStar.tsv.
MMSTAR_LAYOUTS = (("mmstar.parquet", "MMStar.tsv"), ("val-*.parquet", "*/val-*.parquet"),
                  ("*.parquet", "*.tsv"))


def load_mmstar(ctx: LoadContext) -> Iterator[Sample]:
    for rec in records(ctx, MMSTAR_LAYOUTS):
        index = rec.text("index", "id")
        question = rec.text("question")
        if "A" in rec.raw and "B" in rec.raw:  # VLMEvalKit TSV: options in columns A, B, ...
            options = [f"{k}. {rec.raw[k]}" for k in LETTERS[:6]
                       if rec.raw.get(k) not in (None, "")]
        else:  # HF parquet: "...\nOptions: A: x, B: y, C: z, D: w" inside the question
            m = _INLINE_OPTIONS.search(question)
            if not m:
                raise rec.fail("options are neither in columns A, B, ... nor in an 'Options:' "
                               "line of the question")
            options = [f"{k}. {v.strip()}" for k, v in _OPTION_ITEM.findall(m.group(1))]
            question = question[:m.start()].strip()
        question = re.sub(r"^Question:\s*", "", question)
        path = _write_image(ctx, rec, f"{ctx.alias}-{index}")
        meta = {"category": rec.text("category", default=""),
                "l2_category": rec.text("l2_category", "l2-category", default="")}
        yield ctx.choice(rec, index, question, options, rec.get("answer"), path, meta,
                         data_type="image")


MMSTAR = Benchmark(
    name="mmstar", title="MMStar (image benchmark for joint image-video models)",
    formats="TSV (VLMEvalKit MMStar.tsv, base64 images) or parquet (Lin-Chen/MMStar)",
    problem_types=("multiple_choice",),
    metric=MetricSpec("accuracy", breakdowns=("category", "l2_category")), precision="precise",
    source="huggingface.co/datasets/Lin-Chen/MMStar; VLMEvalKit MMStar.tsv",
    files="annotation: the downloaded folder, MMStar.tsv or mmstar.parquet; images are "
           "embedded (written to "
           "<eval.out_dir>/prepared/media/ by --prepare)",
    load=load_mmstar,
    notes="Images use the data.image budget; the same loader reads other VLMEvalKit "
          "multiple-choice TSVs (MMBench, SEED-Bench, AI2D) with the same columns.")


ENTRIES = (MMSTAR,)
