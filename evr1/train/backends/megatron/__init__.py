"""Training backend ``megatron``: megatron-core tensor/pipeline parallelism for Qwen2.5-VL and
Qwen3-VL (dense).

Needs ``megatron-core`` 0.16.1 to 0.19 (a dependency of evr1; tested: constraints.txt). Import
:class:`MegatronBackend` from here; the submodules split the work:

* :mod:`.model`: the decoder as a ``GPTModel`` (config and layer spec from the HF config)
* :mod:`.weights`: HF <-> Megatron weight mapping (QKV / gate-up fusion, TP shards)
* :mod:`.vision`: the HF vision tower and the M-RoPE position ids
* :mod:`.deepstack`: Qwen3-VL's vision features added inside the first decoder layers
* :mod:`.packing`: packed or padded token layout of a micro-batch
* :mod:`.logprobs`: vocab-parallel log-probs and entropy
* :mod:`.parallel`: process groups; :mod:`.cpu_shims`: the CPU-only patches
* :mod:`.spawn`: run a function on N local CPU processes (tests, benchmarks)
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from evr1.train.backends.megatron.backend import MegatronBackend

__all__ = ["MegatronBackend"]


def __getattr__(name: str) -> Any:
    # Lazy: importing the package (e.g. for cpu_shims) must not import megatron-core.
    if name == "MegatronBackend":
        if importlib.util.find_spec("megatron") is None or \
                importlib.util.find_spec("megatron.core") is None:
            raise ImportError("train.backend=megatron needs megatron-core: pip install "
                              "'megatron-core>=0.16.1,<0.20'")
        # heavy: megatron-core is imported only when the megatron backend runs
        from evr1.train.backends.megatron.backend import MegatronBackend

        return MegatronBackend
    raise AttributeError(name)
