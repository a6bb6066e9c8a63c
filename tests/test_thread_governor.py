"""The training loop's thread governor (semivit.trainer.threads): scripted step times in, the
thread count it picks out - quiet machine, another process starting, the load going away."""

import pytest

from semivit.errors import UserError
from semivit.trainer import threads as th


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def make(max_threads=2, **kw):
    clock, calls = Clock(), []
    gov = th.ThreadGovernor(max_threads, set_threads=calls.append, clock=clock, **kw)
    gov.start()
    return gov, clock, calls


def run(gov, clock, per_image: dict, steps: int, images: int = 32) -> list[int]:
    """``steps`` optimiser steps, each taking per_image[threads] seconds per image at the count
    the governor runs with; returns the count each step ran with."""
    ran = []
    for _ in range(steps):
        ran.append(gov.running)
        clock.t += per_image[gov.running] * images
        gov.step(images)
    return ran


QUIET = {2: 1.0e-3, 1: 1.6e-3}  # two threads faster (as measured quietly)
LOADED = {2: 5.0e-3, 1: 2.2e-3}  # beside busy processes: two threads collapse, one keeps going


def test_quiet_machine_keeps_all_cores_and_probes_less_and_less():
    gov, clock, calls = make()
    assert calls == [2] and gov.active
    ran = run(gov, clock, QUIET, 1500)
    assert gov.current == 2 and gov.switches == []
    assert ran.count(1) <= 0.03 * len(ran), ran.count(1)  # probing costs little
    assert gov.probes >= 2 and gov.every > gov.min_every  # backed off while the choice held
    assert ran[-1] == 2


def test_contention_drops_to_one_thread_within_a_few_steps_and_recovers_when_it_ends():
    gov, clock, _ = make()
    run(gov, clock, QUIET, 300)
    assert gov.current == 2
    ran = run(gov, clock, LOADED, 40)
    first_one = ran.index(1)
    assert first_one <= 4, ran  # two slow steps trigger a probe at once, not the next scheduled one
    assert gov.current == 1 and gov.switches[-1][1] == 1
    assert ran[-20:].count(1) >= 18  # then it stays there (rare probes back to two)
    # the load goes away: a later probe finds two threads faster again
    ran = run(gov, clock, QUIET, gov.max_every + 50)
    assert gov.current == 2 and ran[-1] == 2


def test_no_switch_on_a_difference_within_the_margin():
    gov, clock, _ = make(margin=0.05)
    run(gov, clock, {2: 1.0e-3, 1: 0.98e-3}, 400)  # one thread only 2% faster: not worth a switch
    assert gov.current == 2 and gov.switches == []


def test_pauses_between_epochs_are_not_measured():
    gov, clock, _ = make()
    run(gov, clock, QUIET, 100)
    clock.t += 30.0  # validation
    gov.start()
    run(gov, clock, QUIET, 3)
    assert gov.current == 2 and gov.switches == []


def test_one_core_has_nothing_to_choose():
    gov, clock, calls = make(max_threads=1)
    assert not gov.active and calls == [1]
    run(gov, clock, {1: 1e-3}, 100)
    assert gov.probes == 0 and gov.summary()["threads"] == 1


def test_fixed_thread_count_from_the_environment(monkeypatch):
    assert th.fixed_threads({}) is None
    assert th.fixed_threads({th.ENV: "3"}) == 3
    for bad in ("0", "two", "-1"):
        with pytest.raises(UserError, match=th.ENV):
            th.fixed_threads({th.ENV: bad})
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv(th.ENV, "1")
    try:
        assert th.governor_for_training(torch.device("cpu")) is None
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert th.governor_for_training(torch.device("cuda")) is None


def test_fit_reports_the_governor(monkeypatch, tmp_path):
    """A real (tiny) fit runs under the governor and records what it chose."""
    import numpy as np
    import torch

    from semivit import config as cfgmod
    from semivit.data.dataset import ArrayDataset
    from semivit.models.networks import build_model
    from semivit.trainer.engine import fit
    from semivit.trainer.losses import FocalLoss

    before = torch.get_num_threads()
    monkeypatch.delenv(th.ENV, raising=False)
    monkeypatch.setattr(th, "_GOVERNOR", None)
    torch.set_num_threads(2)
    try:
        cfg = cfgmod.resolve(preset="tiny", overrides=["train.epochs=1", "train.batch_size=4"])
        rng = np.random.default_rng(0)
        x = rng.integers(0, 255, (24, 32, 32, 3), dtype=np.uint8)
        y = np.arange(24) % 2
        model = build_model(cfg.model, 2, pretrained=False)
        ds = ArrayDataset(x, y, np.ones(24, np.float32))
        res = fit(model, ds, x[:8], y[:8], cfg, FocalLoss(), torch.device("cpu"), out_dir=tmp_path)
        assert res.threads is not None and res.threads["choices"] == [2, 1]
        assert res.threads["threads"] in (1, 2)
    finally:
        torch.set_num_threads(before)


def test_a_run_that_starts_under_load_finds_one_thread_early():
    gov, clock, _ = make()
    ran = run(gov, clock, LOADED, 30)
    assert gov.current == 1 and ran.index(1) <= 10, ran
    assert ran[-10:] == [1] * 10
