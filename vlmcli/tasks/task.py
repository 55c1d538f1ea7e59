"""What a task is: the one interface run_batch, the Ray pool and the front ends run.

A task prepares one input (decode + preprocess, in a worker thread), runs the model on a batch of
prepared inputs, and says which fields make its records reusable on resume (`identity`). The
optional parts have defaults here, so every caller calls them the same way:

    base(input)               the fields every record of the input starts with
    key(input, use_hash)      the resume key (default: the file's; texts are keyed by content)
    prepare_from(input, src)  prepare `input` from a copy of its bytes at `src` (Ray's shipped files)
    workers / prefetch        decode threads / inputs prepared ahead, where a task knows better
    run_info                  what a report says of the task's model (eval rows)
    close()                   release the model the task opened

`TaskShape` is what a driver knows of a task built elsewhere (a Ray actor): its class, identity and
batch size, not its model. `TaskRecipe` is how to build one: a module-level builder and its arguments.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vlmcli.errors import VlmError
from vlmcli.tasks.resume import FileKey, Record, file_key

if TYPE_CHECKING:
    from vlmcli.tasks.models import ModelSpec


class Task(ABC):
    """One kind of work on one loaded model, one record per input."""

    name: str  # "caption", "ask", "classify", "embed", ...
    identity: dict[str, Any]  # written into every record; resume reuses records whose fields are equal
    batch_size: int = 1  # inputs per model call (CLIP: many; the VLM: 1)
    workers: int | None = None  # decode threads; None: the run's option
    prefetch: int | None = None  # inputs prepared ahead of the model; None: the run's option
    file_inputs: bool = True  # inputs are files (keyed by their stat or content; shipped to Ray as bytes)
    # What a report row says of the model (eval: its store name, file, detail), set by the builder
    # that opened it; it travels back from Ray actors with the task's shape.
    run_info: dict[str, Any] | None = None

    @abstractmethod
    def prepare(self, input: str) -> Any:
        """Decode + preprocess one input (runs in a worker thread; raise VlmError for a bad one)."""

    @abstractmethod
    def run(self, prepared: list[Any]) -> list[Record | VlmError]:
        """The model on a batch of prepared inputs (main thread): result fields per input."""

    def prepare_from(self, input: str, source: str) -> Any:
        """`input` prepared from a copy of its bytes at `source`; a task whose prepared data
        depends on the input's name (its questions) overrides this."""
        return self.prepare(source)

    def base(self, input: str) -> Record:
        return {"path": input, **self.identity}

    def key(self, input: str, use_hash: bool) -> FileKey | None:
        return file_key(input, use_hash)

    def close(self) -> None:
        """Release the model this task opened (derived tasks share their base's and close nothing)."""
        return None


# Another task over the same model, built from a base task where the model is: `variant(base)`.
# Hashable and picklable (a class or a frozen dataclass): Ray actors build and keep one per variant.
Variant = Callable[[Any], Task]


@dataclass
class TaskShape:
    """What a driver needs of a task built elsewhere: its class and identity, not its model."""

    cls: type[Task]
    name: str
    identity: dict[str, Any]
    batch_size: int
    run_info: dict[str, Any] | None = None

    @classmethod
    def of(cls, task: Task) -> TaskShape:
        info = dict(task.run_info) if task.run_info else None
        return cls(type(task), task.name, dict(task.identity), int(task.batch_size), info)

    @property
    def file_inputs(self) -> bool:
        return self.cls.file_inputs

    def stand_in(self) -> Task:
        """An instance of the task's class without a model, for the driver's bookkeeping: `base` and
        `key` use only the identity. `prepare` / `run` are never called on it."""
        task = object.__new__(self.cls)
        task.__dict__.update(name=self.name, identity=self.identity, batch_size=self.batch_size)
        task.run_info = self.run_info
        return task


@dataclass
class TaskRecipe:
    """How to build a task: `build(spec, *args)`, with the actor's CPUs as `spec.n_threads` on Ray
    unless the spec sets them. `build` is a module-level function (Ray actors import it by name), the
    same one a front end calls to build the task here."""

    name: str
    build: Callable[..., Task]
    spec: ModelSpec
    args: tuple[Any, ...] = ()

    def __call__(self) -> Task:
        return self.build(self.spec, *self.args)
