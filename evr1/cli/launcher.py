"""What every launcher shares: ``--config C`` plus ``key.sub=value`` overrides, and logging."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from evr1.config import Config, ConfigError, load_config
from evr1.data.schema import DatasetError
from evr1.video.shards import ShardError


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML config under configs/ (defaults if omitted)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="dotted overrides, e.g. data.video.fps=1.0")
    return parser


def load_from_args(args: argparse.Namespace) -> Config:
    """Load the config or exit with the error message (it names the offending field)."""
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as exc:
        sys.exit(f"config error: {exc}")


def run_launcher(description: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                 run: Callable[[Config, argparse.Namespace], int],
                 argv: list[str] | None = None) -> int:
    """A launcher's ``main``: parse ``argv`` (``--config``, the overrides and what
    ``add_arguments`` adds), set up logging, load the config and return ``run(cfg, args)``.

    A ConfigError, from loading or from ``run`` (settings that only conflict at run time), a
    DatasetError (sample files checked before a stage starts) and a ShardError (shards missing
    or made with other settings) exit with their message rather than a traceback.
    """
    parser = base_parser(description)
    add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging()
    cfg = load_from_args(args)
    try:
        return run(cfg, args)
    except ConfigError as exc:
        sys.exit(f"config error: {exc}")
    except DatasetError as exc:
        sys.exit(f"data error: {exc}{missing_data_hint(exc, args.config)}")
    except ShardError as exc:  # e.g. no shards yet: the message says what to run
        sys.exit(f"shard error: {exc}")


def missing_data_hint(exc: DatasetError, config: str | None) -> str:
    """How to make sample files that do not exist yet (the demo's, in a new checkout)."""
    if not any(e.file and not Path(e.file).exists() for e in exc.errors):
        return ""
    with_config = f" --config {config}" if config else ""
    return (f"\nmissing sample files: `python launchers/pipeline.py{with_config} --stages "
            "preprocess` makes the data and shards first (with synthetic.out_dir set, the "
            "synthetic demo data too)")


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
