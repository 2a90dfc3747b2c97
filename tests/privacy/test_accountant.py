import math

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader, TensorDataset

from privacy.accountant import Mechanism, cumulative_epsilons, epsilon, plan_noise_multiplier, poisson_schedule


def test_history_composes_as_one_opacus_accountant_over_all_rounds():
    rounds = [Mechanism(noise_multiplier=1.1, sample_rate=0.05, steps=40), Mechanism(noise_multiplier=0.9, sample_rate=0.1, steps=20)] * 3
    opacus = RDPAccountant()
    opacus.history = [(m.noise_multiplier, m.sample_rate, m.steps) for m in rounds]
    assert epsilon(rounds, 1e-5) == pytest.approx(opacus.get_epsilon(1e-5), rel=1e-9)
    # a fresh engine per round reports each round alone (under-counts); adding those up over-counts
    alone = [epsilon([m], 1e-5) for m in rounds]
    assert max(alone) < epsilon(rounds, 1e-5) < sum(alone)


def test_cumulative_epsilon_grows_with_every_round_and_ends_at_the_total():
    rounds = [Mechanism(noise_multiplier=1.0, sample_rate=0.1, steps=10)] * 5
    eps = cumulative_epsilons(rounds, [1e-5] * 5)
    assert eps == sorted(eps) and len(set(eps)) == 5
    assert eps[-1] == pytest.approx(epsilon(rounds, 1e-5))


def test_no_noise_means_infinite_epsilon_forever_after():
    assert math.isinf(epsilon([Mechanism(noise_multiplier=1.0, sample_rate=0.1, steps=1), Mechanism(noise_multiplier=0.0, sample_rate=0.1, steps=1)], 1e-5))
    assert epsilon([], 1e-5) == 0.0


@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_planned_noise_spends_the_target_over_the_planned_steps_and_not_more(target):
    q, steps = poisson_schedule(records=700, batch_size=32, epochs=2)
    sigma = plan_noise_multiplier(target, 1e-5, q, steps * 30)
    spent = epsilon([Mechanism(noise_multiplier=sigma, sample_rate=q, steps=steps)] * 30, 1e-5)
    assert target * 0.97 <= spent <= target


def test_schedule_is_the_one_opacus_poisson_loader_runs():
    loader = DPDataLoader.from_data_loader(DataLoader(TensorDataset(torch.arange(700)), batch_size=32))
    q, steps = poisson_schedule(700, 32, epochs=3)
    assert q == pytest.approx(loader.sample_rate) and steps == 3 * len(loader)


_EXTREMES = """
import math
from privacy.accountant import SIGMA_MAX, SIGMA_MIN, Mechanism, epsilon, plan_noise_multiplier
for sigma in (SIGMA_MIN, 1.0, 21.0, 1e4, SIGMA_MAX):
    for q in (1e-12, 0.5, 1.0):
        assert epsilon([Mechanism(noise_multiplier=sigma, sample_rate=q, steps=10**9)], 1e-5) >= 0.0
assert plan_noise_multiplier(1e9, 1e-5, 0.5, 100) >= SIGMA_MIN  # a target near infinity ends
try:
    plan_noise_multiplier(1e-12, 1e-5, 0.5, 10**6)  # and one near zero is refused
except ValueError as exc:
    assert "too low" in str(exc)
else:
    raise AssertionError("a target of 1e-12 was planned")
print("finished")
"""


def test_extreme_but_valid_mechanisms_and_targets_end():
    """Opacus looped for minutes (noise 1e6) or forever (noise inf): every value a Mechanism admits ends. The
    timeout only keeps a regression from hanging the suite; what is asserted is that the process finished."""
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run([sys.executable, "-c", _EXTREMES], capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0 and out.stdout.strip() == "finished", out.stderr[-2000:]


@pytest.mark.parametrize("fields", [{"noise_multiplier": math.inf}, {"noise_multiplier": math.nan}, {"noise_multiplier": 1e300},
                                    {"noise_multiplier": 1e-300}, {"sample_rate": math.nan}, {"steps": 10**18}])
def test_a_degenerate_mechanism_is_not_a_mechanism(fields):
    with pytest.raises(ValueError):
        Mechanism(**({"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10} | fields))


def test_the_accountant_refuses_a_degenerate_curve_it_is_asked_for_directly():
    from privacy.accountant import _rdp_per_step

    for sigma in (math.inf, math.nan, 1e300):
        with pytest.raises(ValueError, match="no RDP curve"):
            _rdp_per_step(sigma, 0.5)


def test_above_the_exact_range_epsilon_is_an_upper_bound_on_opacus():
    acc = RDPAccountant()
    acc.history = [(30.0, 0.01, 1000)]
    ours = epsilon([Mechanism(noise_multiplier=30.0, sample_rate=0.01, steps=1000)], 1e-5)
    assert acc.get_epsilon(1e-5) <= ours <= acc.get_epsilon(1e-5) * 1.5
