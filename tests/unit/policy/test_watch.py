"""The hang watchdog's rule, by table: startup limit before the first step, hang limit after it,
and any step or beat counts as progress."""

from __future__ import annotations

import pytest
from ft_appliance.policy.watch import Limits, decide

L = Limits(hang_s=10.0, startup_s=100.0)


@pytest.mark.parametrize(
    ("now", "launched", "progress", "first_seen", "hung", "waiting_for"),
    [
        (50.0, 0.0, 0.0, False, False, "the first step"),  # loading: within the startup limit
        (101.0, 0.0, 95.0, False, True, "the first step"),  # beats do not extend the startup limit
        (105.0, 0.0, 100.0, True, False, "a step or a beat"),  # 5 s since the last step or beat
        (111.0, 0.0, 100.0, True, True, "a step or a beat"),
        (1000.0, 0.0, 995.0, True, False, "a step or a beat"),  # a long evaluation that keeps beating
    ],
)
def test_decide(now, launched, progress, first_seen, hung, waiting_for) -> None:
    w = decide(now, launched, progress, first_seen, L)
    assert (w.hung, w.waiting_for) == (hung, waiting_for)
    assert w.limit_s == (L.hang_s if first_seen else L.startup_s)
