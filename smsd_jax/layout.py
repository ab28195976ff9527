"""Where each artifact of a run lives: one object that every stage, the study and the report use.

    WORKDIR/
      consortium/head/          the frozen head (never given to the server)
      partition.json            the simulation's split of the data into sites
      sites/site_K/secret.json  site K's permutation key (never sent)
      sites/site_K/head/        site K's own head, with per-site heads (never sent)
      payloads/site_K/          site K's upload
      server/                   checkpoints/, metrics.jsonl, tensorboard/, body/
      results/                  tables, JSON and figures of the stages and experiments
      study/                    the comparison study's runs, one workdir each
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from smsd_jax import files


@dataclasses.dataclass(frozen=True)
class Layout:
    """The paths of a work directory (nothing is created until a stage writes): a local
    folder, or a URI such as `gs://bucket/run` (`files.as_path`)."""

    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", files.as_path(root))

    @classmethod
    def of(cls, workdir: "Layout | str | os.PathLike") -> "Layout":
        """`workdir` itself if it is a Layout, else the Layout of that folder."""
        return workdir if isinstance(workdir, Layout) else cls(workdir)

    # Consortium set-up.
    @property
    def head(self) -> Path:
        return self.root / "consortium" / "head"

    @property
    def partition(self) -> Path:
        return self.root / "partition.json"

    def secret(self, site: int) -> Path:
        return self.root / "sites" / f"site_{site}" / "secret.json"

    def site_head(self, site: int) -> Path:
        """Site `site`'s own head (`config.model.per_site_heads`)."""
        return self.root / "sites" / f"site_{site}" / "head"

    # Stage 1: the sites' uploads.
    @property
    def payloads(self) -> Path:
        return self.root / "payloads"

    def payload(self, site: int) -> Path:
        return self.payloads / f"site_{site}"

    def payload_dirs(self) -> list[Path]:
        """Every `payloads/site_*` folder there is, in site order."""
        found = [p for p in self.payloads.glob("site_*") if p.name[5:].isdigit()]
        return sorted(found, key=lambda p: int(p.name[5:]))

    # Stage 2: the server.
    @property
    def server(self) -> Path:
        return self.root / "server"

    @property
    def checkpoints(self) -> Path:
        return self.server / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.server / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.server / "tensorboard"

    @property
    def body(self) -> Path:
        return self.server / "body"

    # Stage 3 and the experiments.
    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def downstream_json(self) -> Path:
        return self.results / "downstream.json"

    @property
    def study(self) -> Path:
        return self.root / "study"
