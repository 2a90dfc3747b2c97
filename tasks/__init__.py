"""Task registry: a task is one module; registering it is one line here.

Entries are import paths so that validating a run config does not import torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tasks.base import Task

_REGISTRY: dict[str, str] = {
    "defect": "tasks.defect:TASK",
    "process": "tasks.process.task:TASK",
    "table": "tasks.table:TASK",
    "images": "tasks.images:TASK",
}


def task_names() -> list[str]:
    return sorted(_REGISTRY)


def get_task(name: str) -> Task:
    """Return the registered task, importing its module on first use."""
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; registered tasks: {', '.join(task_names())}") from None
    module, _, attr = target.partition(":")
    return getattr(import_module(module), attr)
