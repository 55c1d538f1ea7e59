"""Where a task's model runs: `open_executor(recipe, ray)` builds the task here (LocalExecutor) or
starts a pool of Ray actors that each build it with the same recipe (ray_batch.RemoteTask); either
way the caller holds an Executor, and the model is released when the block ends."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from vlmcli.tasks.runner import Executor, LocalExecutor
from vlmcli.tasks.task import TaskRecipe

if TYPE_CHECKING:
    from vlmcli.tasks.ray_batch import RayOptions


@contextlib.contextmanager
def open_executor(recipe: TaskRecipe, ray: RayOptions | None = None) -> Iterator[Executor]:
    """The recipe's task, here (ray None) or on a Ray pool; closed (the model, or the actors) on exit."""
    if ray is not None:
        from vlmcli.tasks.ray_batch import RayPool  # imports Ray itself only when the pool starts

        with RayPool(recipe, ray) as pool:
            yield pool.task()
        return
    task = recipe()
    try:
        yield LocalExecutor(task)
    finally:
        task.close()
