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
    """Inverse-frequency weights from the plant's own labels: skewed defect rates need no global statistics.

    Classes the plant never saw get weight 1 (not a huge one): they contribute no loss terms locally anyway.
    """
    counts = torch.bincount(labels, minlength=num_classes).float()
    present = counts > 0
    weights = torch.ones(num_classes)
    weights[present] = counts.sum() / (int(present.sum()) * counts[present])
    return weights / weights[present].mean()


def train_classifier(
    model: nn.Module,
    data: PlantData,
    settings: TrainSettings,
    num_classes: int,
    augment: Augment | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict[str, float]:
    """Class-weighted cross-entropy. The weights come from the plant's own label counts, which its data
    profile already discloses, so under DP-SGD they are public and each record's loss depends on it alone."""
    gen = torch.Generator().manual_seed(settings.seed)
    weights = class_weights(data.y_train, num_classes)
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=settings.learning_rate, momentum=0.9)
    model.train()
    seen, loss_sum, correct = 0, 0.0, 0
    started = time.perf_counter()
    with settings.local_training.session(model, optimizer, data, settings, gen) as (net, optimizer, batches):
        for idx in batches:
            x, y = data.x_train[idx], data.y_train[idx]
            if augment is not None:
                x = augment(x, gen)
            optimizer.zero_grad(set_to_none=True)
            logits = net(x)
            loss = settings.local_training.reduce(F.cross_entropy(logits, y, weight=weights, reduction="none"), weights[y])
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


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve by ranks (ties averaged); NaN when only one class is present."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = scores.argsort()
    sorted_scores = scores[order]
    ranks = torch.empty(len(scores), dtype=torch.float64)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # average the ranks of tied scores
    uniq, inverse, counts = torch.unique(sorted_scores, return_inverse=True, return_counts=True)
    if len(uniq) < len(scores):
        sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, ranks[order])
        ranks[order] = (sums / counts)[inverse]
    return float((ranks[positive.bool()].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def macro_f1(pred: torch.Tensor, y: torch.Tensor, num_classes: int, recalls: dict[str, float] | None = None) -> float:
    """Mean F1 over the classes present in `y` or predicted; fills `recalls` with each present class's recall."""
    f1s = []
    for c in range(num_classes):
        tp = ((pred == c) & (y == c)).sum().item()
        fp = ((pred == c) & (y != c)).sum().item()
        fn = ((pred != c) & (y == c)).sum().item()
        if tp + fp + fn == 0:
            continue  # a class absent from this test set and never predicted says nothing
        recall = tp / (tp + fn) if tp + fn else 0.0
        precision = tp / (tp + fp) if tp + fp else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
        if recalls is not None and tp + fn:
            recalls[f"eval_recall_class{c}"] = recall
    return sum(f1s) / max(len(f1s), 1)


def trivial_baselines(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict[str, float]:
    """What the release gate compares a model with at this plant: how many classes the test split holds and the model
    predicts, and the macro-F1 of the best constant answer (always "good", a model that never alarms)."""
    constant = max((macro_f1(torch.full_like(y, c), y, num_classes) for c in y.unique().tolist()), default=0.0)
    return {
        "eval_test_classes": float(len(y.unique())),
        "eval_predicted_classes": float(len(pred.unique())),
        f"eval_{TRIVIAL_PREFIX}macro_f1": constant,
    }


TRIVIAL_PREFIX = "trivial_"  # eval_trivial_<metric>: the gate metric's score of a model that answers one thing


def classification_metrics(logits: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Accuracy, macro-F1 over the classes present in `y` or predicted, per-class recall, AUROC.

    AUROC: class 1 vs class 0 for two classes (defective vs good); the mean one-vs-rest AUROC otherwise.
    """
    pred = logits.argmax(1)
    metrics = {"eval_loss": F.cross_entropy(logits, y).item(), "eval_accuracy": (pred == y).float().mean().item()}
    metrics["eval_macro_f1"] = macro_f1(pred, y, num_classes, recalls=metrics)
    metrics |= trivial_baselines(pred, y, num_classes)
    proba = logits.softmax(1)
    if num_classes == 2:
        metrics["eval_auroc"] = auroc(proba[:, 1], y == 1)
    else:
        per_class = [auroc(proba[:, c], y == c) for c in range(num_classes)]
        finite = [a for a in per_class if a == a]
        metrics["eval_auroc"] = sum(finite) / len(finite) if finite else float("nan")
    return metrics


def evaluate_classifier(model: nn.Module, data: PlantData, num_classes: int) -> dict[str, float]:
    started = time.perf_counter()
    metrics = classification_metrics(predict_logits(model, data.x_test), data.y_test, num_classes)
    metrics["eval_time_s"] = time.perf_counter() - started
    return metrics
