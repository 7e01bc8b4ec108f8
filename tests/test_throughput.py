import pytest

from brcd import engine
from brcd.engine import encode_throughput


class _Clock:
    """A fake ``time.perf_counter``: only the fake models' encodes advance it."""

    now = 0.0

    def __call__(self):
        return self.now


class _Model:
    """An encode of a batch costs ``seconds`` of fake time, 4x that inside the clock's ``burst``
    window (load from another job on a shared machine)."""

    def __init__(self, clock, seconds, burst):
        self.clock, self.seconds, self.burst, self.calls = clock, seconds, burst, 0

    def eval(self):
        return self

    def encode(self, x):
        self.calls += 1
        slow = self.burst[0] <= self.clock.now < self.burst[1]
        self.clock.now += self.seconds * (4 if slow else 1)


def test_encode_throughput_takes_each_models_best_round_measured_in_turns(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(engine.time, "perf_counter", clock)
    burst = (0.0, 0.1)  # the warm-up and the first round of both models run under load
    fast, slow = _Model(clock, 0.002, burst), _Model(clock, 0.010, burst)
    speed = encode_throughput({"fast": fast, "slow": slow}, 8, batch_size=4, rounds=3, min_seconds=0.03)
    assert speed == {"fast": pytest.approx(4 / 0.002), "slow": pytest.approx(4 / 0.010)}  # unloaded rates
    assert speed["fast"] / speed["slow"] == pytest.approx(5.0)
    assert fast.calls > 3 * slow.calls  # each turn timed whole batches until min_seconds had passed


def test_encode_throughput_loaded_rounds_only_when_every_round_is_loaded(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(engine.time, "perf_counter", clock)
    model = _Model(clock, 0.01, (0.0, 1e9))
    assert encode_throughput({"m": model}, 8, batch_size=4, rounds=2, min_seconds=0.05) == {"m": pytest.approx(100.0)}
