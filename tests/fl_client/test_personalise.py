"""Personalisation picks by validation records carved from the training split, never by the test split."""

from __future__ import annotations

import torch

from fl_client.personalise import PersonaliseSettings, choose, validation_split
from tasks import get_task
from tasks.base import PlantData, TaskOptions
from tasks.defect import DefectProfile

TASK = get_task("defect")
SPEC = TASK.make_spec({"plant-1": DefectProfile(task="defect", fingerprint="f" * 64, examples=1)}, TaskOptions(model="effnet-lite0"))
FAST = PersonaliseSettings(epochs=5, batch_size=32, learning_rate=0.5)


def plant_data(shift: float, n: int = 240, seed: int = 0) -> PlantData:
    """Unit feature vectors whose class is told by the direction `shift` weights (a plant's own line)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (2 * n,), generator=gen)
    x = torch.randn(2 * n, 2560, generator=gen) * 0.05
    x[:, 0] += shift * (2 * y - 1).float()
    x = x / x.norm(dim=1, keepdim=True)
    return PlantData(x[:n], y[:n], x[n:], y[n:], fingerprint="f" * 64)


def constant_model() -> torch.nn.Module:
    """A 'global' model that always answers class 0: the kind of model a plant must not end up serving."""
    model = TASK.build_model(SPEC)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.net[-1].bias[0] = 5.0
    return model


def test_validation_is_cut_from_the_training_records_only():
    data = plant_data(1.0)
    split = validation_split(data, seed=0)
    assert len(split.y_train) + len(split.y_test) == len(data.y_train)
    train_rows = {tuple(r.tolist()) for r in data.x_train[:, :3]}
    assert all(tuple(r.tolist()) in train_rows for r in split.x_test[:, :3])


def test_a_useless_global_model_is_replaced_by_a_better_variant():
    choice = choose(TASK, SPEC, constant_model(), plant_data(1.0), "eval_macro_f1", FAST)
    assert choice.variant in ("personalised", "local")
    assert max(choice.scores.values()) > choice.scores["global"] + 0.3


def test_a_good_global_model_is_kept_on_ties():
    # already perfect on validation: nothing trained here can beat it, and ties go to the global model
    good = TASK.build_model(SPEC)
    with torch.no_grad():
        for p in good.parameters():
            p.zero_()
        good.net[-1].weight[1, 0], good.net[-1].weight[0, 0] = 50.0, -50.0
    choice = choose(TASK, SPEC, good, plant_data(1.0), "eval_macro_f1", FAST)
    assert choice.scores["global"] == 1.0 and choice.variant == "global"


def test_the_choice_never_reads_the_test_split():
    data = plant_data(1.0)
    corrupted = PlantData(data.x_train, data.y_train, torch.full_like(data.x_test, float("nan")), 1 - data.y_test,
                          fingerprint=data.fingerprint)
    clean = choose(TASK, SPEC, constant_model(), data, "eval_macro_f1", FAST)
    dirty = choose(TASK, SPEC, constant_model(), corrupted, "eval_macro_f1", FAST)
    assert (clean.variant, clean.scores) == (dirty.variant, dirty.scores)
    torch.testing.assert_close(clean.model.net[-1].weight, dirty.model.net[-1].weight)  # and the same served model


def test_folds_cover_every_training_record_once_as_validation():
    from fl_client.personalise import validation_folds

    data = plant_data(1.0, n=100)
    folds = validation_folds(data, seed=3, folds=5)
    seen = torch.cat([f.x_test for f in folds])
    assert len(folds) == 5 and len(seen) == len(data.y_train)
    assert {tuple(r[:3].tolist()) for r in seen} == {tuple(r[:3].tolist()) for r in data.x_train}
    assert all(abs(int(f.y_test.sum()) - int(data.y_train.sum()) / 5) <= 1 for f in folds)  # stratified by label


def test_a_linear_head_may_serve_a_blend_that_is_the_ensemble_of_global_and_local_logits():
    from fl_client.personalise import _blend, is_linear_head

    data = plant_data(1.0)
    choice = choose(TASK, SPEC, constant_model(), data, "eval_macro_f1", FAST)
    assert {f"personalised@blend{b:g}" for b in FAST.blends} <= set(choice.scores)
    torch.manual_seed(1)
    g, local = TASK.build_model(SPEC), TASK.build_model(SPEC)
    blended = _blend(g, local, 0.25)
    with torch.no_grad():
        torch.testing.assert_close(blended(data.x_test), 0.25 * g(data.x_test) + 0.75 * local(data.x_test))

    mlp_spec = SPEC.model_copy(update={"model": "effnet-lite0-mlp"})
    assert is_linear_head(g) and not is_linear_head(TASK.build_model(mlp_spec))
    mlp = choose(TASK, mlp_spec, TASK.build_model(mlp_spec), data, "eval_macro_f1", FAST)
    assert not any("blend" in name for name in mlp.scores)  # blending two MLPs' weights is no ensemble
