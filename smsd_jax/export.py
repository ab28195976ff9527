"""The body export: what the server sends back to the sites, once; and a timm export.

An artifact (Orbax + meta.json) holding the teacher's body parameters (class token, stem if
any, blocks, final norm) and the settings needed to rebuild `ViTBody` without the server's
config. `export_timm` writes a site's whole model (its head + the body + its tail) as a timm
`VisionTransformer` state dict (`.npz`) and model kwargs (`.json`), for PyTorch users; a
body's stem is folded into the head there (`fold_stem`), so timm sees a plain ViT.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from smsd_jax import artifacts, files, models
from smsd_jax.errors import SMSDError

FORMAT = "smsd-body/1"


def save_body(path: str | Path, body: models.ViTBody, params, **meta) -> None:
    """Writes `params` of `body` to `path`; `meta` adds facts such as the training step.

    A body with a stem adds `token_dim` to the meta, and one with per-site stems
    `site_stems`; without them the meta is as it was before stems existed (a missing field
    reads as 0). `weight_init` is recorded so that a site's random body (the baseline of
    stage 3) is initialised as the trained one was.
    """
    stem = dict(token_dim=body.token_dim) if body.token_dim else {}
    stem |= dict(site_stems=body.site_stems) if body.site_stems else {}
    artifacts.save_artifact(path, params, dict(
        meta, format=FORMAT, dim=body.dim, depth=body.depth, heads=body.heads,
        mlp_ratio=body.mlp_ratio, weight_init=body.weight_init, **stem))


def load_body(path: str | Path) -> tuple[models.ViTBody, dict, dict]:
    """Reads a body export: `(ViTBody, params, meta)` (float32 compute)."""
    params, meta = artifacts.load_artifact(path)
    if meta.get("format") != FORMAT:
        raise SMSDError(f"{path} is not a body export (format {meta.get('format')!r}, "
                        f"expected {FORMAT!r}); use the server's export folder")
    body = models.ViTBody(dim=meta["dim"], depth=meta["depth"], heads=meta["heads"],
                          mlp_ratio=meta["mlp_ratio"], token_dim=meta.get("token_dim", 0),
                          site_stems=meta.get("site_stems", 0),
                          weight_init=meta.get("weight_init", "dino"))  # older exports: DINO's
    return body, params, meta


# ---------------------------------------------------------------- timm export
# The full ViT (a site's head + the body + optionally its tail) as a timm `VisionTransformer`
# state dict, so the model runs in PyTorch: `VisionTransformer(**kwargs)` with the sidecar's
# kwargs, then `load_state_dict` of the arrays (as tensors).


def timm_kwargs(head: models.ViTHead, body: models.ViTBody, in_chans: int,
                num_classes: int) -> dict:
    """The `timm.models.VisionTransformer` keyword arguments of head + body (+ tail)."""
    return dict(img_size=head.image_size, patch_size=head.patch_size, in_chans=in_chans,
                embed_dim=body.dim, depth=body.depth, num_heads=body.heads,
                mlp_ratio=float(body.mlp_ratio), num_classes=num_classes,
                global_pool="token", class_token=True)


def _linear(dense) -> dict:
    """A Flax Dense (`kernel [in, out]`) as a torch Linear (`weight [out, in]`)."""
    return {"weight": dense["kernel"].T, "bias": dense["bias"]}


def _layer_norm(norm) -> dict:
    return {"weight": norm["scale"], "bias": norm["bias"]}


def _block(block) -> dict:
    return {"norm1": _layer_norm(block["norm1"]), "attn.qkv": _linear(block["attn"]["qkv"]),
            "attn.proj": _linear(block["attn"]["proj"]), "norm2": _layer_norm(block["norm2"]),
            "mlp.fc1": _linear(block["fc1"]), "mlp.fc2": _linear(block["fc2"])}


def fold_stem(head_params, body_params) -> tuple[dict, dict]:
    """The head and the body's stem as one head at the body's width, and the stemless body.

    The stem is linear and acts on each token: `(W x + b + P) S + c = x (W S) + (b S + c) +
    P S` with the head's patch kernel `W [p*p*C, d]`, bias `b`, position embedding `P [N, d]`
    and the stem's kernel `S [d, D]`, bias `c`. So the head `(W S, b S + c, P S)` followed
    by the body without its stem computes the same function. The products are taken in
    float64 and returned as float32.

    Returns:
      `(head_params, body_params)`: `{"patch_embed": {"kernel" [p*p*C, D], "bias" [D]},
      "pos_embed" [N, D]}` and `body_params` without `"stem"`.
    """
    f64 = lambda x: np.asarray(x, np.float64)
    s, c = f64(body_params["stem"]["kernel"]), f64(body_params["stem"]["bias"])
    embed = head_params["patch_embed"]
    head = {"patch_embed": {"kernel": (f64(embed["kernel"]) @ s).astype(np.float32),
                            "bias": (f64(embed["bias"]) @ s + c).astype(np.float32)},
            "pos_embed": (f64(head_params["pos_embed"]) @ s).astype(np.float32)}
    return head, {k: v for k, v in body_params.items() if k != "stem"}


def timm_state_dict(head: models.ViTHead, head_params, body: models.ViTBody, body_params,
                    tail_params=None) -> dict[str, np.ndarray]:
    """Our parameters under timm's `vit_*` names and layouts, float32 NumPy arrays.

    - `patch_embed.proj.weight [D, C, p, p]`: our patch kernel `[p*p*C, D]` flattens each
      patch in (row, column, channel) order (`models.patchify`); a conv weight is
      (out, channel, row, column).
    - `pos_embed [1, 1+N, D]`: timm adds it to the class token too; our class token has no
      position, so its row is zeros.
    - Linear weights `[out, in]` (torch) are our kernels `[in, out]` transposed; the fused
      `qkv` keeps its (q, k, v) x heads output order, which timm splits the same way.
    - A body with a stem (`body.token_dim > 0`): the stem is folded into the patch and
      position embeddings (`fold_stem`); timm's ViT, of width D, has no stem.

    Args:
      head, head_params: a site's `ViTHead` and its parameters (`consortium.load_head`).
      body, body_params: `ViTBody` and its parameters (`load_body`).
      tail_params: the classification tail `{"kernel" [D, classes], "bias"}` or None.
    """
    p, dim = head.patch_size, body.dim
    if head.constant_patches != "placed":
        raise SMSDError(f"the head sends constant patches {head.constant_patches}, which a timm "
                        "ViT cannot do (it adds the position embedding to every patch); export "
                        "the model a site fine-tuned, downstream.deployable(model), whose head "
                        "places every patch")
    shape = np.shape(head_params["patch_embed"]["kernel"])
    if head.dim != body.input_dim or shape[1] != head.dim or shape[0] % (p * p):
        raise SMSDError(f"the head makes tokens of width {head.dim} from a patch kernel of "
                        f"shape {shape}, but the body takes tokens of width {body.input_dim}; "
                        "export the body with the head it was trained for")
    if body.token_dim:
        head_params, body_params = fold_stem(head_params, body_params)
    kernel = np.asarray(head_params["patch_embed"]["kernel"], np.float32)
    channels = kernel.shape[0] // (p * p)
    pos = np.asarray(head_params["pos_embed"], np.float32)
    modules = {
        "patch_embed.proj": {"weight": kernel.reshape(p, p, channels, dim).transpose(3, 2, 0, 1),
                             "bias": head_params["patch_embed"]["bias"]},
        "norm": _layer_norm(body_params["norm"]),
    }
    for i in range(body.depth):
        modules.update({f"blocks.{i}.{name}": params
                        for name, params in _block(body_params[f"block{i}"]).items()})
    if tail_params is not None:
        modules["head"] = _linear(tail_params)
    state = {"cls_token": body_params["cls_token"],
             "pos_embed": np.concatenate([np.zeros((1, dim), np.float32), pos])[None],
             **{f"{module}.{k}": v for module, params in modules.items()
                for k, v in params.items()}}
    # C order: a transposed view would be saved Fortran-ordered, which torch users trip on.
    return {name: np.ascontiguousarray(v, np.float32) for name, v in state.items()}


def export_timm(path: str | Path, head: models.ViTHead, head_params, body: models.ViTBody,
                body_params, *, num_classes: int = 0, tail_params=None) -> Path:
    """Writes head + body (+ tail) as a timm ViT: `<path>` (.npz) and its `.json` sidecar.

    The `.npz` holds `timm_state_dict`; the sidecar holds `timm_kwargs`, so in PyTorch:
    `VisionTransformer(**json.load(sidecar))` then `load_state_dict({k: torch.from_numpy(v)})`.
    Images go in as `[B, C, H, W]`, normalised as the site normalises them for the head.
    Each file is written under a temporary name and renamed into place, so a reader sees the
    old file or the new one whole, never a part.

    Args:
      path: the `.npz` to write; the sidecar is the same name with `.json`.
      num_classes: 0 takes the tail's number of classes (0, a headless model, without a
        tail); any other value must equal the tail's.
      tail_params: the classification tail `{"kernel" [D, classes], "bias"}` (the `"tail"`
        of `models.ViTClassifier`'s parameters), or None.

    Returns:
      The sidecar's path.
    """
    path = Path(path)
    if path.suffix != ".npz":
        raise SMSDError(f"timm export path {path} must end in .npz (the sidecar gets .json)")
    classes = 0 if tail_params is None else int(np.shape(tail_params["kernel"])[1])
    if num_classes not in (0, classes):
        raise SMSDError(f"num_classes={num_classes} but the tail has {classes} classes; pass "
                        "the tail of that many classes, or num_classes=0 to follow the tail")
    state = timm_state_dict(head, head_params, body, body_params, tail_params)
    in_chans = state["patch_embed.proj.weight"].shape[1]
    files.save_npz(path, **state)
    sidecar = path.with_suffix(".json")
    files.write_json(sidecar, timm_kwargs(head, body, in_chans, classes))
    return sidecar


def export_classifier(path: str | Path, model: models.ViTClassifier, params) -> Path:
    """`export_timm` of a site's classifier (`downstream.deployable`'s, fine-tuned: head, body
    and tail). The timm model takes images normalised as `(x - model.mean) / model.std`."""
    return export_timm(path, model.head, params["head"], model.body, params["body"],
                       tail_params=params["tail"])
