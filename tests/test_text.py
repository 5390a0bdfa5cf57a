"""Numbers as people read them: durations in their natural unit, running times as a compact clock."""

from __future__ import annotations

import pytest

from featcache.text import clock, duration


@pytest.mark.parametrize(("seconds", "shown"), [(0.42, "0.42 s"), (119.994, "119.99 s"), (120, "2.0 min"),
                                                (210, "3.5 min"), (3599, "60.0 min"), (3600, "1.00 h"),
                                                (8100, "2.25 h"), (360_000, "100.00 h")])
def test_duration_picks_its_unit(seconds, shown):
    assert duration(seconds) == shown


@pytest.mark.parametrize(("seconds", "shown"), [(0, "0s"), (41.6, "42s"), (59.4, "59s"), (59.6, "1m00s"),
                                                (245, "4m05s"), (3599, "59m59s"), (3600, "1h00m"),
                                                (4020, "1h07m"), (90_000, "25h00m")])
def test_clock_is_compact(seconds, shown):
    assert clock(seconds) == shown
