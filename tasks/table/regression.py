"""Local training and evaluation for regression: MSE on the standardised target, metrics in original units."""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.nn import functional as F

from tasks.base import PlantData, TrainSettings
from tasks.classification import predict_logits
from tasks.table.spec import Scaling


def train_regressor(
    model: nn.Module, data: PlantData, settings: TrainSettings, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, float]:
    gen = torch.Generator().manual_seed(settings.seed)
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=settings.learning_rate, momentum=0.9)
    model.train()
    seen, loss_sum = 0, 0.0
    started = time.perf_counter()
    with settings.local_training.session(model, optimizer, data, settings, gen) as (net, optimizer, batches):
        for idx in batches:
            y = data.y_train[idx]
            optimizer.zero_grad(set_to_none=True)
            loss = settings.local_training.reduce(F.mse_loss(net(data.x_train[idx]).squeeze(-1), y, reduction="none"), torch.ones_like(y))
            loss.backward()
            optimizer.step()
            seen += len(idx)
            loss_sum += loss.item() * len(idx)
    return {"train_loss": loss_sum / max(seen, 1), "train_time_s": time.perf_counter() - started}


def regression_metrics(pred: torch.Tensor, y: torch.Tensor, scaling: Scaling) -> dict[str, float]:
    """`pred` and `y` are standardised; eval_loss stays on that scale (comparable to train_loss), the rest do not."""
    pred, y = pred.double(), y.double()
    err = (pred - y) * scaling.std
    y_orig = y * scaling.std + scaling.mean
    total = float(((y_orig - y_orig.mean()) ** 2).sum())
    return {
        "eval_loss": float(((pred - y) ** 2).mean()),
        "eval_rmse": float(err.pow(2).mean().sqrt()),
        "eval_mae": float(err.abs().mean()),
        "eval_r2": 1.0 - float(err.pow(2).sum()) / total if total > 0 else float("nan"),
        "eval_trivial_r2": 0.0,  # predicting the test split's own mean, the best constant answer, scores R^2 0 by definition
    }


def evaluate_regressor(model: nn.Module, data: PlantData, scaling: Scaling) -> dict[str, float]:
    started = time.perf_counter()
    metrics = regression_metrics(predict_logits(model, data.x_test).squeeze(-1), data.y_test, scaling)
    metrics["eval_time_s"] = time.perf_counter() - started
    return metrics
