"""Task specs (see :mod:`medmae.tasks.base`): each module registers one task; importing this package registers all.

To add a task: write ``medmae/tasks/<name>.py`` with a :class:`~medmae.tasks.base.Task` subclass decorated with
``@register_task``, and import it below. See ``docs/tasks.md``.
"""

from medmae.tasks import classify, pretrain, segment  # noqa: F401  (registration)
from medmae.tasks.base import (
    EvalContext,
    NoOptions,
    Task,
    file_kinds,
    register_task,
    task_class,
    task_for_file_kind,
    task_names,
)


def get_task(cfg) -> Task:
    """The spec of ``cfg.task``, bound to the job config."""
    return task_class(cfg.task)(cfg)


__all__ = [
    "EvalContext",
    "NoOptions",
    "Task",
    "file_kinds",
    "get_task",
    "register_task",
    "task_class",
    "task_for_file_kind",
    "task_names",
]
