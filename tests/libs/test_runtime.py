import gc
from collections.abc import Iterator

import pytest

from sendtime_common.config import ConfigError
from sendtime_common.runtime import (
    DEFAULT_GC_GEN0_THRESHOLD,
    gc_gen0_threshold_from_env,
    tune_garbage_collector,
)


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("restored_gc")
def test_tuning_freezes_what_exists_and_raises_only_the_young_threshold() -> None:
    gc.unfreeze()
    _, gen1, gen2 = gc.get_threshold()
    alive = [[i] for i in range(1000)]  # containers the collector tracks

    tune_garbage_collector(50_000)

    assert gc.get_threshold() == (50_000, gen1, gen2)
    assert gc.get_freeze_count() >= len(alive)
    assert all(gc.is_tracked(x) for x in alive)


@pytest.mark.usefixtures("restored_gc")
def test_cycles_are_still_collected_once_the_threshold_is_reached() -> None:
    tune_garbage_collector(1_000)
    collected_before = sum(s["collected"] for s in gc.get_stats())

    for _ in range(5_000):  # unreachable cycles: reference counting cannot free them
        cycle: list[object] = []
        cycle.append(cycle)
    del cycle

    assert sum(s["collected"] for s in gc.get_stats()) - collected_before >= 1_000


def test_threshold_comes_from_the_environment() -> None:
    assert gc_gen0_threshold_from_env({}) == DEFAULT_GC_GEN0_THRESHOLD
    assert gc_gen0_threshold_from_env({"GC_GEN0_THRESHOLD": "5000"}) == 5000
    with pytest.raises(ConfigError, match="GC_GEN0_THRESHOLD must be at least 1"):
        gc_gen0_threshold_from_env({"GC_GEN0_THRESHOLD": "0"})
