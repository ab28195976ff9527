"""One body, several downstream tasks: `config.downstream.tasks`.

A site rarely has one question for the body it gets back. Each entry of
`config.downstream.tasks` names a task and overrides `config.data` (what is labelled, and how)
and, optionally, `config.downstream` (how it is probed) for that task alone:

    c.downstream.tasks = {
        "diagnosis": {},  # config.data's own labels
        "findings": {"data": {"source": "folder", "task": "multilabel", "path": "/data/cxr",
                              "labels_csv": "/data/cxr/train.csv", ...}},
        "lungs": {"data": {"source": "mask_folder", "task": "segmentation", ...},
                  "downstream": {"segment_steps": 1000}},
    }

Stage 3 then evaluates the same head and body on each task in turn, in the order of their
names (the head fixes the image size and channels every task must have), and reports them
together: every result row carries its task's name under "task". With no tasks, stage 3
evaluates `config.data` alone and its rows carry no task name.
"""

from __future__ import annotations

import contextlib

import ml_collections

from smsd_jax.errors import SMSDError

# What a task may override: the data it is labelled on, and the probes' settings.
OVERRIDES = ("data", "downstream")


def task_configs(config) -> list[tuple[str, ml_collections.ConfigDict]]:
    """`[(name, config of the task)]` in the order of the tasks' names (ml_collections keeps a
    ConfigDict's keys sorted); each task's config is `config` with the task's overrides
    applied and no tasks of its own. Without tasks: `[("", config)]`.

    Raises:
      SMSDError: a task's name is not an identifier, or it overrides something other than
        `OVERRIDES` or a key that `config.data` / `config.downstream` does not have (named,
        with the keys it has).
    """
    tasks = config.downstream.get("tasks") or {}
    if not tasks:
        return [("", config)]
    out = []
    for name, entry in tasks.items():
        where = f"config.downstream.tasks.{name}"
        if not name.isidentifier():  # it names files (downstream_accuracy_<task>.png)
            raise SMSDError(f"{where}: a task's name must be letters, digits and _, so that "
                            "--config.downstream.tasks.NAME.data.KEY=... can set it")
        entry = dict(entry or {})
        unknown = sorted(set(entry) - set(OVERRIDES))
        if unknown:
            raise SMSDError(f"{where}: {unknown} cannot be set per task; a task overrides "
                            f"only {OVERRIDES}")
        values = config.to_dict()
        values["downstream"]["tasks"] = {}
        for part, changes in entry.items():
            changes = dict(changes or {})
            missing = sorted(set(changes) - set(values[part]))
            if missing:
                raise SMSDError(f"{where}.{part}: {missing} are not keys of config.{part}; "
                                f"it has {sorted(values[part])}")
            values[part].update(changes)
        out.append((name, ml_collections.ConfigDict(values)))
    return out


@contextlib.contextmanager
def named(name: str):
    """An `SMSDError` raised inside names the task (`config.downstream.tasks.NAME: ...`), of
    the same type; with no name (no tasks), it passes as raised."""
    try:
        yield
    except SMSDError as e:
        if not name:
            raise
        raise type(e)(f"config.downstream.tasks.{name}: {e}") from e


def by_task(results: list[dict]) -> dict[str, list[dict]]:
    """Result rows grouped by their "task" ("" for rows without one), in first-seen order."""
    groups: dict[str, list[dict]] = {}
    for row in results:
        groups.setdefault(row.get("task", ""), []).append(row)
    return groups


def title(name: str, config) -> str:
    """A task's heading in tables and figures: its name, kind and source."""
    return f"{name} ({config.data.task}, {config.data.source})"
