"""Tuning of the Python runtime that every service applies once it has started."""

from __future__ import annotations

import gc
from collections.abc import Mapping

from sendtime_common.config import env_int

# CPython's default is 700. See tune_garbage_collector for why a service wants far more.
DEFAULT_GC_GEN0_THRESHOLD = 100_000


def gc_gen0_threshold_from_env(env: Mapping[str, str]) -> int:
    """``GC_GEN0_THRESHOLD``: net allocations between young collections (default 100,000).

    Raises:
        sendtime_common.config.ConfigError: the value is not a positive integer.
    """
    return env_int(env, "GC_GEN0_THRESHOLD", DEFAULT_GC_GEN0_THRESHOLD, minimum=1)


def tune_garbage_collector(gen0_threshold: int = DEFAULT_GC_GEN0_THRESHOLD) -> None:
    """Freeze what start-up built, and run the cycle collector every ``gen0_threshold`` net
    allocations of container objects instead of every 700.

    Reference counting frees almost everything a request or a merged batch allocates; the cycle
    collector only finds reference cycles, which the hot paths do not make. At 700, though, it
    ran hundreds of times a second under load, each time walking everything a batch still held
    and promoting it, which in turn set off full collections over the long-lived caches: in
    bench-ingest it took 36% of the profile service's CPU and 21% of ingest's, and raising the
    threshold to 100,000 left under 2% (docs/benchmarks.md). What it costs is memory: up to that
    many unreachable objects can wait for a collection, a few MB.

    ``gc.freeze()`` moves everything alive now (modules, descriptors, the app's own objects)
    into a generation that collections never walk again.
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1, gen2)
