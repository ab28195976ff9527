"""The timm export: timm's names and shapes, a timm-style forward equal to ours, atomic writes.

The forward pass below is timm's `VisionTransformer` written out in NumPy from the exported
arrays alone, in timm's conventions (NCHW images, a convolution over `[D, C, p, p]`, torch
`Linear` weights `[out, in]`, a fused `[3D, D]` qkv), so it runs everywhere; where torch and
timm are installed, the export is also loaded into timm itself and compared.
"""

import json
import math

import jax
import numpy as np
import pytest

from configs import base
from smsd_jax import downstream, export, models
from smsd_jax.data import fashion_mnist

IMAGE, PATCH, CLASSES = 28, 4, 10
MEAN, STD = 0.286, 0.353  # configs/base.py: config.data.mean, config.data.std
SIZE = models.preset("tiny")


def _expected_names(depth: int, with_head: bool) -> dict[str, tuple]:
    """timm `vit_*` state-dict names and shapes for this test's model."""
    d, n, c = SIZE["dim"], (IMAGE // PATCH) ** 2, 1
    names = {"cls_token": (1, 1, d), "pos_embed": (1, 1 + n, d),
             "patch_embed.proj.weight": (d, c, PATCH, PATCH), "patch_embed.proj.bias": (d,),
             "norm.weight": (d,), "norm.bias": (d,)}
    for i in range(depth):
        b = f"blocks.{i}."
        names.update({
            b + "norm1.weight": (d,), b + "norm1.bias": (d,),
            b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "norm2.weight": (d,), b + "norm2.bias": (d,),
            b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc1.bias": (4 * d,),
            b + "mlp.fc2.weight": (d, 4 * d), b + "mlp.fc2.bias": (d,)})
    if with_head:
        names.update({"head.weight": (CLASSES, d), "head.bias": (CLASSES,)})
    return names


def _perturbed_classifier(token_dim: int = 0):
    """A classifier with every parameter perturbed: init leaves biases at 0 and norm scales
    at 1, which would hide a bias or scale exported to the wrong place. `token_dim` > 0: a
    head of that width and a body with a stem."""
    net = models.ViTClassifier(models.ViTHead(IMAGE, PATCH, token_dim or SIZE["dim"]),
                               models.ViTBody(**SIZE, token_dim=token_dim), num_classes=CLASSES)
    params = net.init(jax.random.key(0), np.zeros((1, IMAGE, IMAGE, 1), np.float32))["params"]
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return net, jax.tree.unflatten(treedef, noisy)


@pytest.fixture(scope="module")
def model():
    return _perturbed_classifier()


def _export(net, params, path, tail=True):
    return export.export_timm(path, net.head, params["head"], net.body, params["body"],
                              tail_params=params["tail"] if tail else None)


# ---------------------------------------------------------------- timm's forward, in NumPy


def _layer_norm(x, sd, name, eps=1e-6):  # timm ViT: nn.LayerNorm(eps=1e-6)
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * sd[name + ".weight"] + sd[name + ".bias"]


def _linear(x, sd, name):  # torch nn.Linear: x @ W.T + b, W [out, in]
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def _gelu(x):  # torch nn.GELU(): the exact (erf) form
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _patch_embed(images_nchw, weight, bias):
    """Conv2d(kernel=stride=p) then flatten(2).transpose(1, 2): `[B, N, D]`, grid row-major."""
    b, c, h, w = images_nchw.shape
    d, _, p, _ = weight.shape
    cols = [images_nchw[:, :, i:i + p, j:j + p].reshape(b, c * p * p)
            for i in range(0, h, p) for j in range(0, w, p)]
    return np.stack(cols, axis=1) @ weight.reshape(d, c * p * p).T + bias


def timm_forward(sd, kwargs, images_nchw):
    """timm `VisionTransformer.forward_features` and `forward_head` -> (features, logits)."""
    x = _patch_embed(images_nchw, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"])
    b, _, d = x.shape
    x = np.concatenate([np.broadcast_to(sd["cls_token"], (b, 1, d)), x], axis=1)
    x = x + sd["pos_embed"]
    heads = kwargs["num_heads"]
    for i in range(kwargs["depth"]):
        blk = f"blocks.{i}."
        t = x.shape[1]
        qkv = _linear(_layer_norm(x, sd, blk + "norm1"), sd, blk + "attn.qkv")
        q, k, v = qkv.reshape(b, t, 3, heads, d // heads).transpose(2, 0, 3, 1, 4)
        attn = _softmax(q @ k.transpose(0, 1, 3, 2) * (d // heads) ** -0.5)
        out = (attn @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
        x = x + _linear(out, sd, blk + "attn.proj")
        y = _linear(_layer_norm(x, sd, blk + "norm2"), sd, blk + "mlp.fc1")
        x = x + _linear(_gelu(y), sd, blk + "mlp.fc2")
    features = _layer_norm(x, sd, "norm")[:, 0]  # global_pool="token"
    logits = _linear(features, sd, "head") if kwargs["num_classes"] else features
    return features, logits


# ---------------------------------------------------------------- tests


@pytest.mark.slow
def test_names_and_shapes_follow_timm(model, tmp_path):
    net, params = model
    for with_head in (True, False):
        path = tmp_path / f"vit_{with_head}.npz"
        sidecar = _export(net, params, path, tail=with_head)
        with np.load(path) as npz:
            shapes = {name: npz[name].shape for name in npz.files}
            assert all(npz[name].dtype == np.float32 and npz[name].flags.c_contiguous
                       for name in npz.files)
        assert shapes == _expected_names(SIZE["depth"], with_head)
        assert json.loads(sidecar.read_text()) == dict(
            img_size=IMAGE, patch_size=PATCH, in_chans=1, embed_dim=SIZE["dim"],
            depth=SIZE["depth"], num_heads=SIZE["heads"], mlp_ratio=4.0,
            num_classes=CLASSES if with_head else 0, global_pool="token", class_token=True)
    with np.load(tmp_path / "vit_True.npz") as npz:
        np.testing.assert_array_equal(npz["pos_embed"][0, 0], 0.0)  # class token: no position


@pytest.mark.slow
@pytest.mark.parametrize("token_dim", [0, 8])
def test_timm_forward_on_the_export_equals_our_model(token_dim, tmp_path):
    # token_dim 8: head of width 8 -> stem -> body of width 32; the export is the plain ViT of
    # width 32 (timm's names and shapes, the stem folded in), and timm's forward is ours.
    net, params = _perturbed_classifier(token_dim=token_dim)
    images = fashion_mnist("test").images[:4].astype(np.float32) / 255.0
    images = (images - MEAN) / STD
    features = net.apply({"params": params}, images, method="features")
    logits = net.apply({"params": params}, images)
    path = tmp_path / "vit.npz"
    kwargs = json.loads(_export(net, params, path).read_text())
    assert kwargs["embed_dim"] == SIZE["dim"]
    with np.load(path) as npz:
        assert {name: npz[name].shape for name in npz.files} == _expected_names(
            SIZE["depth"], with_head=True)
        sd = {name: npz[name].astype(np.float64) for name in npz.files}
    timm_features, timm_logits = timm_forward(sd, kwargs, images.transpose(0, 3, 1, 2))
    np.testing.assert_allclose(timm_features, features, atol=1e-4)
    np.testing.assert_allclose(timm_logits, logits, atol=1e-4)
    assert np.abs(logits).max() > 0.1  # a real signal, not agreement on zeros


@pytest.mark.slow
def test_body_export_keeps_its_stem(tmp_path):
    net, params = _perturbed_classifier(token_dim=8)
    export.save_body(tmp_path / "body", net.body, params["body"], step=3)
    body, loaded, meta = export.load_body(tmp_path / "body")
    assert (body.dim, body.token_dim, meta["token_dim"]) == (SIZE["dim"], 8, 8)
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.device_get(params["body"]))
    # Without a stem the meta is as before stems existed: no token_dim.
    plain, plain_params = _perturbed_classifier()
    export.save_body(tmp_path / "plain", plain.body, plain_params["body"], step=3)
    body, _, meta = export.load_body(tmp_path / "plain")
    assert "token_dim" not in meta and body.token_dim == 0


def test_body_export_keeps_its_init_so_the_random_baseline_matches(tmp_path):
    # Stage 3's random body is the loaded body initialised afresh: it must start as the
    # trained one did (lecun-normal here), not as the module's default (DINO's).
    body = models.ViTBody(**SIZE, weight_init="lecun")
    tokens = np.zeros((1, 4, SIZE["dim"]), np.float32)
    params = body.init(jax.random.key(0), tokens)["params"]
    export.save_body(tmp_path / "body", body, params, step=0)
    loaded, _, meta = export.load_body(tmp_path / "body")
    assert meta["weight_init"] == loaded.weight_init == "lecun"
    fresh = loaded.init(jax.random.key(0), tokens)["params"]
    jax.tree.map(np.testing.assert_array_equal, fresh, jax.device_get(params))
    dino = models.ViTBody(**SIZE).init(jax.random.key(0), tokens)["params"]
    assert not np.allclose(fresh["block0"]["fc1"]["kernel"], dino["block0"]["fc1"]["kernel"])


def test_export_replaces_a_file_whole_and_leaves_no_temporary_file(model, tmp_path):
    net, params = model
    path = tmp_path / "vit.npz"
    _export(net, params, path)
    changed = jax.tree.map(lambda x: x + 1.0, params)
    _export(net, changed, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit.json", "vit.npz"]
    with np.load(path) as npz:
        np.testing.assert_allclose(npz["cls_token"], np.asarray(changed["body"]["cls_token"]))
        np.testing.assert_allclose(npz["head.bias"], np.asarray(changed["tail"]["bias"]))


def test_a_failed_write_keeps_the_old_file(model, tmp_path, monkeypatch):
    net, params = model
    path = tmp_path / "vit.npz"
    _export(net, params, path)
    before = path.read_bytes()

    def fail_midway(f, **arrays):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(export.np, "savez", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        _export(net, jax.tree.map(lambda x: x + 1.0, params), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit.json", "vit.npz"]


def test_export_rejects_wrong_inputs(model, tmp_path):
    net, params = model
    with pytest.raises(ValueError, match=r"must end in \.npz"):
        _export(net, params, tmp_path / "vit.pt")
    with pytest.raises(ValueError, match="num_classes=3 but the tail has 10"):
        export.export_timm(tmp_path / "vit.npz", net.head, params["head"], net.body,
                           params["body"], num_classes=3, tail_params=params["tail"])
    wide = models.ViTBody(dim=2 * SIZE["dim"], depth=1, heads=2)
    with pytest.raises(ValueError, match="export the body with the head it was trained for"):
        export.export_timm(tmp_path / "vit.npz", net.head, params["head"], wide, params["body"])
    stem = models.ViTBody(**SIZE, token_dim=8)  # takes tokens of width 8, the head makes 32
    with pytest.raises(ValueError, match="takes tokens of width 8"):
        export.export_timm(tmp_path / "vit.npz", net.head, params["head"], stem, params["body"])
    unplaced = net.head.clone(constant_patches="unplaced")
    with pytest.raises(ValueError, match=r"a timm ViT cannot do.*deployable\(model\)"):
        export.export_timm(tmp_path / "vit.npz", unplaced, params["head"], net.body,
                           params["body"])


# ---------------------------------------------------------------- the default site model


@pytest.fixture(scope="module")
def site_model():
    """The default config's site model (head of width 16 with blank patches unplaced, a stem,
    the small4 body), as stage 3 fine-tunes and keeps it (`downstream.deployable`), after a
    few fine-tuning steps on real images; and real test images in [0, 1] with blank patches."""
    config = base.get_config()
    head = models.head_from_config(config)
    assert head.constant_patches == "unplaced"
    model = models.ViTClassifier(head, models.body_from_config(config), CLASSES,
                                 mean=config.data.mean, std=config.data.std)
    params = model.init(jax.random.key(0), np.zeros((1, IMAGE, IMAGE, 1), np.float32))["params"]
    tuning = downstream.deployable(model)
    tuned, info = downstream.fit(tuning, params, fashion_mnist("train"), np.arange(64), epochs=1,
                                 lr=1e-3, batch_size=32, seed=0)
    assert info["steps"] == 2
    images = fashion_mnist("test").images[:8].astype(np.float32) / 255.0
    blank = models.patchify(images, PATCH).max(-1) == models.patchify(images, PATCH).min(-1)
    assert np.asarray(blank).any()  # the comparison covers blank patches
    return tuning, tuned, images


def _normalised_nchw(tuning, images):
    return ((images - tuning.mean) / tuning.std).transpose(0, 3, 1, 2)


@pytest.mark.slow
def test_the_default_site_model_exports_with_the_same_predictions(site_model, tmp_path):
    tuning, tuned, images = site_model
    logits = np.asarray(tuning.apply({"params": tuned}, images))
    path = tmp_path / "site.npz"
    kwargs = json.loads(export.export_classifier(path, tuning, tuned).read_text())
    with np.load(path) as npz:
        sd = {name: npz[name].astype(np.float64) for name in npz.files}
    _, timm_logits = timm_forward(sd, kwargs, _normalised_nchw(tuning, images))
    scale = np.abs(logits).max()
    np.testing.assert_allclose(timm_logits, logits, rtol=0, atol=1e-4 * scale)
    assert (timm_logits.argmax(-1) == logits.argmax(-1)).all()


def test_the_export_loads_in_real_timm_and_predicts_the_same(site_model, tmp_path):
    torch = pytest.importorskip("torch", reason="torch is not installed: the NumPy timm "
                                "forward above stands in for it")
    vit = pytest.importorskip("timm.models.vision_transformer", reason="timm is not installed")
    tuning, tuned, images = site_model
    path = tmp_path / "site.npz"
    kwargs = json.loads(export.export_classifier(path, tuning, tuned).read_text())
    net = vit.VisionTransformer(**kwargs).eval()
    with np.load(path) as npz:
        net.load_state_dict({k: torch.from_numpy(npz[k]) for k in npz.files}, strict=True)
    with torch.no_grad():
        timm_logits = net(torch.from_numpy(_normalised_nchw(tuning, images).copy())).numpy()
    logits = np.asarray(tuning.apply({"params": tuned}, images))
    np.testing.assert_allclose(timm_logits, logits, rtol=0, atol=1e-4 * np.abs(logits).max())
