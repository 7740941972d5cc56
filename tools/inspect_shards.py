"""Inspect a shard folder: counts, failures, sizes, and a full checksum check.

    python tools/inspect_shards.py runs/demo/shards            # summary + checksums
    python tools/inspect_shards.py runs/demo/shards --no-verify
    python tools/inspect_shards.py runs/demo/shards --sample ID # one sample's metadata

Exits non-zero when a shard or a sample does not match its recorded checksum.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

from tqdm import tqdm

from evr1.files import file_sha256, read_jsonl
from evr1.video.shards import FAILURES, ShardReader, frames_sha256


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shard_dir", type=Path)
    parser.add_argument("--no-verify", action="store_true", help="skip the checksum pass")
    parser.add_argument("--sample", help="print the metadata of one sample id")
    args = parser.parse_args(argv)
    reader = ShardReader(args.shard_dir)
    if args.sample:
        print(json.dumps(reader.entry(args.sample).__dict__, indent=1))
        return 0
    print_summary(reader)
    print_failures(args.shard_dir)
    return 0 if args.no_verify else verify(reader)


def print_summary(reader: ShardReader) -> None:
    media = list(reader.media.values())
    by_type = collections.Counter(m.data_type for m in media)
    by_backend = collections.Counter(m.backend for m in media)
    shards = sorted({m.shard for m in media})
    size = sum((reader.shard_dir / s).stat().st_size for s in shards)
    raw = sum(_nbytes(m.shape) for m in media)
    print(f"{reader.shard_dir}: {len(reader)} samples over {len(media)} media files "
          f"({dict(by_type)}) in {len(shards)} shards")
    print(f"  frames: {sum(m.num_frames for m in media)}; backends: {dict(by_backend)}")
    print(f"  size on disk {size / 2**20:.2f} MiB for {raw / 2**20:.2f} MiB of raw frames "
          f"(ratio {raw / size if size else 0:.2f})")
    shapes = collections.Counter(tuple(m.shape[1:3]) for m in media)
    print(f"  frame sizes (H, W): {dict(shapes.most_common(5))}")


def print_failures(shard_dir: Path) -> None:
    failures = read_jsonl(shard_dir / FAILURES)
    print(f"  failures: {len(failures)} samples ({shard_dir / FAILURES})")
    for row in failures[:20]:
        print(f"    {row['id']}: {row['path']}: {row['reason']}")
    if len(failures) > 20:
        print(f"    ... and {len(failures) - 20} more")


def verify(reader: ShardReader) -> int:
    manifest = json.loads((reader.shard_dir / "manifest.json").read_text())
    bad = []
    for shard in manifest["shards"]:
        if file_sha256(reader.shard_dir / shard["shard"]) != shard["shard_sha256"]:
            bad.append(f"shard {shard['shard']}: file checksum differs from the manifest")
    for media_id, entry in tqdm(reader.media.items(), desc="verify", unit="media"):
        try:
            frames = reader.read_frames(entry)
        except (OSError, KeyError) as exc:  # a damaged shard may not even parse
            bad.append(f"media {media_id} ({entry.path}): unreadable: {exc}")
            continue
        if frames_sha256(frames) != entry.sha256:
            bad.append(f"media {media_id} ({entry.path}): frame checksum differs")
    for line in bad:
        print(f"  CHECKSUM MISMATCH: {line}")
    print(f"  checksums: {'OK' if not bad else f'{len(bad)} mismatches'}")
    return 1 if bad else 0


def _nbytes(shape: list[int]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


if __name__ == "__main__":
    sys.exit(main())
