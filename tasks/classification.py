"""Local training and evaluation shared by classification tasks."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from tasks.base import PlantData, TrainSettings

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights from the plant's own labels: skewed defect rates need no global statistics."""
    counts = torch.bincount(labels, minlength=num_classes).float()
    weights = counts.sum() / (num_classes * counts.clamp(min=1.0))
    return weights / weights.mean()


def train_classifier(
    model: nn.Module,
    data: PlantData,
    settings: TrainSettings,
    num_classes: int,
    augment: Augment | None = None,
) -> dict[str, float]:
    gen = torch.Generator().manual_seed(settings.seed)
    weights = class_weights(data.y_train, num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.learning_rate, momentum=0.9)
    model.train()
    n = len(data.y_train)
    seen, loss_sum, correct = 0, 0.0, 0
    started = time.perf_counter()
    for _ in range(settings.epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, settings.batch_size):
            idx = order[start : start + settings.batch_size]
            x, y = data.x_train[idx], data.y_train[idx]
            if augment is not None:
                x = augment(x, gen)
            optimizer.zero_grad(set_to_none=True)
            logits = model(x)
            loss = F.cross_entropy(logits, y, weight=weights)
            loss.backward()
            optimizer.step()
            seen += len(y)
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
    return {
        "train_loss": loss_sum / max(seen, 1),
        "train_accuracy": correct / max(seen, 1),
        "train_time_s": time.perf_counter() - started,
    }


@torch.no_grad()
def evaluate_classifier(model: nn.Module, data: PlantData, num_classes: int, batch_size: int = 256) -> dict[str, float]:
    started = time.perf_counter()
    model.eval()
    logits = torch.cat([model(data.x_test[i : i + batch_size]) for i in range(0, len(data.y_test), batch_size)])
    y = data.y_test
    pred = logits.argmax(1)
    metrics = {
        "eval_loss": F.cross_entropy(logits, y).item(),
        "eval_accuracy": (pred == y).float().mean().item(),
    }
    f1s = []
    for c in range(num_classes):
        tp = ((pred == c) & (y == c)).sum().item()
        fp = ((pred == c) & (y != c)).sum().item()
        fn = ((pred != c) & (y == c)).sum().item()
        recall = tp / (tp + fn) if tp + fn else 0.0
        precision = tp / (tp + fp) if tp + fp else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
        metrics[f"eval_recall_class{c}"] = recall
    metrics["eval_macro_f1"] = sum(f1s) / num_classes
    metrics["eval_time_s"] = time.perf_counter() - started
    return metrics
