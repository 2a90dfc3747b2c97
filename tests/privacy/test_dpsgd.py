import pytest
import torch
from torch import nn

from maxfl.errors import ConfigError
from maxfl.weights import pack
from privacy.accountant import Mechanism, poisson_schedule
from privacy.dpsgd import DPSGD, PrivacyError, check_model, grad_sample_mode_for
from tasks.base import PlantData, TrainSettings
from tasks.classification import train_classifier


def _data(n: int = 64) -> PlantData:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=gen)
    y = (x[:, 0] > 0).long()
    return PlantData(x, y, x[:8], y[:8], fingerprint="f" * 64)


def _model(linear_only: bool = False) -> nn.Module:
    """GroupNorm: trained with per-record hooks; `linear_only` (a head on features): with ghost clipping."""
    torch.manual_seed(0)
    if linear_only:
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))
    return nn.Sequential(nn.Linear(6, 16), nn.GroupNorm(4, 16), nn.ReLU(), nn.Linear(16, 2))


def _dpsgd(data: PlantData, settings: TrainSettings, sigma: float = 1.0, max_grad_norm: float = 1.0, mode: str = "hooks") -> DPSGD:
    q, steps = poisson_schedule(len(data.private_records()), settings.batch_size, settings.epochs)
    return DPSGD(Mechanism(noise_multiplier=sigma, sample_rate=q, steps=steps), max_grad_norm, mode)  # type: ignore[arg-type]


def _train(model, data, settings, dp, optimizer=None):
    return train_classifier(model, data, TrainSettings(**{**settings.__dict__, "local_training": dp}), 2, optimizer=optimizer)


SETTINGS = TrainSettings(epochs=2, batch_size=16, learning_rate=0.1, seed=3)


@pytest.mark.parametrize("mode", ["hooks", "ew", "ghost"])
def test_dp_training_leaves_a_plain_model_with_its_own_weight_names(mode):
    data, model = _data(), _model()
    names = list(model.state_dict())
    before = pack(model)
    _train(model, data, SETTINGS, _dpsgd(data, SETTINGS, mode=mode))
    assert list(model.state_dict()) == names and not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert pack(model).keys() == before.keys()


def test_noise_does_not_come_from_the_round_seed_the_anchor_knows():
    data = _data()
    a, b = _model(), _model()
    _train(a, data, SETTINGS, _dpsgd(data, SETTINGS))
    _train(b, data, SETTINGS, _dpsgd(data, SETTINGS))
    assert not torch.equal(a[0].weight, b[0].weight)  # same seed, same data: different noise and batches
    c, d = _model(), _model()
    train_classifier(c, data, SETTINGS, 2)
    train_classifier(d, data, SETTINGS, 2)
    assert torch.equal(c[0].weight, d[0].weight)  # without DP the round is reproducible from its seed


def test_the_plant_clips_linear_heads_with_ghost_clipping_and_other_models_with_hooks():
    from tasks.defect.model import DefectCNN
    from tasks.features import FeatureHead

    assert grad_sample_mode_for(FeatureHead(2560, 2)) == grad_sample_mode_for(FeatureHead(2560, 2, hidden=64)) == "ghost"
    assert grad_sample_mode_for(DefectCNN(2)) == grad_sample_mode_for(_model()) == "hooks"
    frozen = _model()
    for p in frozen[:2].parameters():
        p.requires_grad_(False)
    assert grad_sample_mode_for(frozen) == "ghost"  # only what trains counts


@pytest.mark.parametrize("linear_only", [False, True], ids=["hooks", "ghost"])
def test_per_record_clipping_bounds_how_far_one_round_moves_the_model(linear_only):
    data, model = _data(), _model(linear_only)
    start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    dp = _dpsgd(data, SETTINGS, sigma=1e-6, max_grad_norm=1e-3, mode="auto")
    _train(model, data, SETTINGS, dp, optimizer=torch.optim.SGD(model.parameters(), lr=1.0))
    assert dp.grad_sample_mode == ("ghost" if linear_only else "hooks")
    moved = (torch.cat([p.detach().flatten() for p in model.parameters()]) - start).norm().item()
    # each step: at most C per record drawn, divided by the expected batch size; Poisson batches rarely exceed 3x it
    assert 0 < moved <= dp.mechanism.steps * 1e-3 * 3


@pytest.mark.parametrize("linear_only", [False, True], ids=["hooks", "ghost"])
def test_empty_poisson_batches_still_take_a_noisy_step(linear_only):
    data = _data(n=3)
    settings = TrainSettings(epochs=10, batch_size=1, learning_rate=0.1, seed=0)
    dp = _dpsgd(data, settings, mode="auto")
    _train(_model(linear_only), data, settings, dp)  # 30 steps at q = 1/3: some batches are empty


def test_a_schedule_other_than_the_recorded_one_is_refused_before_training():
    data, model = _data(), _model()
    before = [p.detach().clone() for p in model.parameters()]
    recorded = _dpsgd(data, TrainSettings(epochs=1, batch_size=16, learning_rate=0.1, seed=0))
    with pytest.raises(PrivacyError, match="ledger recorded"):
        _train(model, data, SETTINGS, recorded)  # SETTINGS trains 2 epochs
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_only_records_that_share_no_raw_sample_are_drawn():
    data = _data()
    tiling = torch.arange(0, 64, 4)
    data = PlantData(data.x_train, data.y_train, data.x_test, data.y_test, data.fingerprint, disjoint_train=tiling)
    seen: set[int] = set()

    class Spy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = _model()

        def forward(self, x):
            for row in x:
                seen.add(int(torch.nonzero((data.x_train == row).all(1))[0]))
            return self.inner(x)

    _train(Spy(), data, SETTINGS, _dpsgd(data, SETTINGS))
    assert seen and seen <= set(tiling.tolist())


def test_models_opacus_cannot_train_privately_are_named():
    with pytest.raises(ConfigError, match="cannot be trained with DP-SGD.*BatchNorm"):
        check_model(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))


def _task_models() -> list[nn.Module]:
    from tasks.defect.model import DefectCNN
    from tasks.process.model import ProcessCNN, ProcessMLP
    from tasks.table import TASK as TABLE
    from tasks.table.model import build_table_model

    return [DefectCNN(2), DefectCNN(3, in_channels=3), ProcessCNN(53, 17), ProcessMLP(53, 20, 17),
            *(build_table_model(name, 12, 2) for name in TABLE.models)]


def test_every_task_model_can_be_trained_privately():
    for model in _task_models():
        check_model(model)
