"""federation.byte_budget's rule on hand-computed totals (the round loop's use of it: tests/test_server.py)."""
import pytest

from fedfm.budget import ByteCount
from fedfm.errors import ConfigError


def test_the_next_round_is_estimated_as_the_largest_so_far():
    b = ByteCount(100)
    assert b.fits(1) and b.fits(50)  # nothing counted yet: no estimate
    row = {"bytes_up": 20, "bytes_down": 10}
    b.count(1, row, first=True)
    assert row["bytes_total"] == 30 and (b.total, b.largest) == (30, 30)
    assert b.why_stop(1, 10) is None and b.fits(2) and not b.fits(3)  # 30 + 60 <= 100 < 30 + 90
    b.count(2, {"bytes_up": 10, "bytes_down": 10}, first=False)  # a smaller round: the estimate stays 30
    assert (b.total, b.largest) == (50, 30) and b.fits(1) and not b.fits(2)
    b.count(3, {"bytes_up": 15, "bytes_down": 10}, first=False)
    assert b.total == 75
    why = b.why_stop(3, 10)  # 75 + 30 > 100
    assert why.startswith("byte budget reached: round 4 (estimated at 30 bytes") and "from 75 to 105" in why
    assert b.why_stop(3, 3) is None  # the last of federation.rounds anyway


def test_a_round_larger_than_every_one_before_can_overshoot_and_says_so():
    b = ByteCount(100)
    b.count(1, {"bytes_up": 30, "bytes_down": 10}, first=True)
    b.count(2, {"bytes_up": 60, "bytes_down": 10}, first=False)  # 40 fitted the estimate; 70 did not
    assert b.total == 110 and "10 over federation.byte_budget=100" in b.why_stop(2, 10)


def test_a_first_round_over_the_budget_is_refused_and_no_budget_counts_only():
    with pytest.raises(ConfigError, match=r"federation\.byte_budget=1,000 bytes is smaller than one round: round 1 "
                                          r"sent 1,500 bytes \(1,000 up, 500 down\)"):
        ByteCount(1000).count(1, {"bytes_up": 1000, "bytes_down": 500}, first=True)
    free = ByteCount(None)
    for rnd in range(1, 4):
        free.count(rnd, {"bytes_up": 10**9, "bytes_down": 10**9}, first=rnd == 1)
        assert free.why_stop(rnd, 10) is None and free.fits(10**6)
    assert free.total == 6 * 10**9


def test_the_count_checkpoints_and_is_rebuilt_from_rows():
    b = ByteCount(100)
    b.count(1, {"bytes_up": 5, "bytes_down": 7}, first=True)
    c = ByteCount(100)
    c.load_state_dict(b.state_dict())
    assert (c.total, c.largest, c.known) == (12, 12, True)
    old = ByteCount(100)
    old.load_state_dict({})  # a checkpoint from before the count was kept
    assert not old.known
    old.from_rows([{"round": 0, "eval_loss": 1.0}, {"round": 1, "bytes_up": 5, "bytes_down": 7},
                   {"round": 2, "bytes_up": 9, "bytes_down": 1}])
    assert (old.total, old.largest) == (22, 12)
