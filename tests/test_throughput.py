import time

import pytest

from brcd.engine import encode_throughput


class _Sleeper:
    """Stands in for a model: each encode of a batch takes ``seconds``."""

    def __init__(self, seconds):
        self.seconds, self.calls = seconds, 0

    def eval(self):
        return self

    def encode(self, x):
        self.calls += 1
        time.sleep(self.seconds)


def test_encode_throughput_measures_models_side_by_side():
    fast, slow = _Sleeper(0.002), _Sleeper(0.010)
    speed = encode_throughput({"fast": fast, "slow": slow}, 8, batch_size=4, rounds=3, min_seconds=0.03)
    assert set(speed) == {"fast", "slow"}
    assert speed["fast"] == pytest.approx(4 / 0.002, rel=0.5) and speed["slow"] == pytest.approx(4 / 0.010, rel=0.5)
    assert 3 < speed["fast"] / speed["slow"] < 6
    assert slow.calls >= 1 + 3 * 3  # warm-up + every round timed whole batches for min_seconds
