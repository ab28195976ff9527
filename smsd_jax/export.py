"""The body export: what the server sends back to the sites, once.

An artifact (Orbax + meta.json) holding the teacher's body parameters (class token, blocks,
final norm) and the settings needed to rebuild `ViTBody` without the server's config.
"""

from __future__ import annotations

from pathlib import Path

from smsd_jax import checkpoint, models

FORMAT = "smsd-body/1"


def save_body(path: str | Path, body: models.ViTBody, params, **meta) -> None:
    """Writes `params` of `body` to `path`; `meta` adds facts such as the training step."""
    checkpoint.save_artifact(path, params, dict(
        meta, format=FORMAT, dim=body.dim, depth=body.depth, heads=body.heads,
        mlp_ratio=body.mlp_ratio))


def load_body(path: str | Path) -> tuple[models.ViTBody, dict, dict]:
    """Reads a body export: `(ViTBody, params, meta)` (float32 compute)."""
    params, meta = checkpoint.load_artifact(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a body export (format {meta.get('format')!r}, "
                         f"expected {FORMAT!r}); use the server's export folder")
    body = models.ViTBody(dim=meta["dim"], depth=meta["depth"], heads=meta["heads"],
                          mlp_ratio=meta["mlp_ratio"])
    return body, params, meta
