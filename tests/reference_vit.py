"""A plain NumPy ViT forward pass, written from the textbook, to check the Flax modules."""

import math

import numpy as np

_erf = np.vectorize(math.erf)


def _gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _layer_norm(x, p, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _dense(x, p):
    return x @ p["kernel"] + p["bias"]


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def vit_forward(images, head, body, patch_size, heads):
    """images [B, H, W, C] -> (class feature [B, D], token features [B, N, D]).

    `head` and `body` are the Flax parameter dicts, as NumPy. Patches come from a loop over
    the grid (not a reshape), attention from explicit per-head matrices.
    """
    images = np.asarray(images, np.float64)
    b, h, w, c = images.shape
    p = patch_size
    patches = np.stack([images[:, i:i + p, j:j + p, :].reshape(b, -1)
                        for i in range(0, h, p) for j in range(0, w, p)], axis=1)
    x = _dense(patches, head["patch_embed"]) + head["pos_embed"]
    cls = np.broadcast_to(body["cls_token"], (b, 1, x.shape[-1]))
    x = np.concatenate([cls, x], axis=1)
    dim = x.shape[-1]
    hd = dim // heads
    depth = sum(1 for k in body if k.startswith("block"))
    for i in range(depth):
        blk = body[f"block{i}"]
        y = _layer_norm(x, blk["norm1"])
        qkv = _dense(y, blk["attn"]["qkv"]).reshape(b, -1, 3, heads, hd)
        out = np.zeros((b, x.shape[1], heads, hd))
        for hh in range(heads):
            q, k, v = qkv[:, :, 0, hh], qkv[:, :, 1, hh], qkv[:, :, 2, hh]
            a = _softmax(q @ k.transpose(0, 2, 1) / math.sqrt(hd))
            out[:, :, hh] = a @ v
        x = x + _dense(out.reshape(b, -1, dim), blk["attn"]["proj"])
        y = _layer_norm(x, blk["norm2"])
        x = x + _dense(_gelu(_dense(y, blk["fc1"])), blk["fc2"])
    x = _layer_norm(x, body["norm"])
    return x[:, 0], x[:, 1:]
