"""The PyTorch peer of the server step: timm's ViT blocks, a DINO head equal to ours, the same
DINO step, bf16 autocast, eager or `torch.compile`.

Imported by `benchmarks/server_step.py` only when the peer is asked for (torch and timm are no
dependency of the project). The step does what `distill.make_distill_step` does, in the same
order: views by masked sub-sampling of the received samples `[batch, M, K, D]` (2 global views
from two different samples, `num_local` local views), teacher forward on the global views,
student forward + backward on all views, DINO loss with centring and sharpening over every
pair of different views, global-norm clipping, AdamW (weight decay on matrices only, not on
the class token), EMA teacher, centre update. Schedules are the project's own
(`distill.make_schedules`), read from a table so the step does no JAX work.

The body is timm's `VisionTransformer` (no pretrained weights) without its patch embedding and
position embedding: class token + `blocks` + `norm`, applied to token sets, as our `ViTBody`.
"""

from __future__ import annotations

import copy
import gc
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import timm
from timm.models.vision_transformer import VisionTransformer

from smsd_jax import distill, models, ops


def versions() -> dict:
    return dict(torch=torch.__version__, timm=timm.__version__)


def device_for(jax_platform: str) -> torch.device | None:
    """Where JAX runs, as torch names it (None: torch cannot run there, e.g. on a TPU)."""
    if jax_platform == "cpu":
        return torch.device("cpu")
    if jax_platform in ("gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(n: int, device: torch.device, dtype: str, calls: int = 10,
                  windows: int = 5) -> float:
    """torch's `n^3` matmul rate on `device`, timed as `server_step.jax_matmul_tflops` times
    JAX's (a cross-check of the card's rate)."""
    a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    a @ b
    times = []
    for _ in range(windows):
        sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            a @ b
        sync(device)
        times.append((time.perf_counter() - start) / calls)
    return 2 * n ** 3 / float(np.median(times)) / 1e12


class DINOHead(nn.Module):
    """Ours (`models.DINOHead`): MLP with GELU, L2 norm, unit-norm prototypes (norm_last_layer)."""

    def __init__(self, dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int,
                 num_layers: int):
        super().__init__()
        widths = [dim] + [hidden_dim] * (num_layers - 1)
        layers = []
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Linear(a, b), nn.GELU()]
        layers.append(nn.Linear(widths[-1], bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.last_layer_v = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        for w in [m.weight for m in self.mlp if isinstance(m, nn.Linear)] + [self.last_layer_v]:
            nn.init.trunc_normal_(w, std=0.02, a=-0.04, b=0.04)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """features `[B, D]` -> logits `[B, out_dim]` float32."""
        x = F.normalize(self.mlp(x).float(), dim=-1, eps=1e-6)
        w = F.normalize(self.last_layer_v.float(), dim=1)
        return F.linear(x, w).float()


class PeerNet(nn.Module):
    """timm ViT's class token + blocks + final norm (a body over token sets) + DINO head."""

    def __init__(self, vit: VisionTransformer, head: DINOHead):
        super().__init__()
        self.cls_token, self.blocks, self.norm, self.head = (vit.cls_token, vit.blocks,
                                                             vit.norm, head)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens `[B, K, D]` -> logits `[B, out_dim]`."""
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = self.norm(self.blocks(torch.cat([cls, tokens], dim=1)))
        return self.head(x[:, 0])


def build_net(config) -> PeerNet:
    p, s = models.preset(config.model.size), config.server
    vit = VisionTransformer(img_size=config.data.image_size, patch_size=config.model.patch_size,
                            embed_dim=p["dim"], depth=p["depth"], num_heads=p["heads"],
                            mlp_ratio=4.0, qkv_bias=True, num_classes=0)
    head = DINOHead(p["dim"], s.out_dim, s.hidden_dim, s.bottleneck_dim,
                    models.DINOHead.num_layers)
    return PeerNet(vit, head)


def _pick(samples: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """samples `[B, M, K, D]`, sample index `[B, V]` -> `[B, V, K, D]`."""
    return torch.gather(samples, 1, index[:, :, None, None].expand(-1, -1, *samples.shape[2:]))


def _mask_sample(views: torch.Tensor, keep: float) -> torch.Tensor:
    """A uniformly random subset of `round(keep * K)` tokens of each view, in input order."""
    k = ops.num_kept(views.shape[2], keep)
    noise = torch.rand(views.shape[:3], device=views.device)
    index = noise.topk(k, dim=-1).indices.sort(dim=-1).values
    return torch.gather(views, 2, index[..., None].expand(-1, -1, -1, views.shape[-1]))


def make_views(samples: torch.Tensor, global_keep: float, local_keep: float, num_local: int):
    """`distill.make_views`: global views `[B, 2, Kg, D]`, local views `[B, L, Kl, D]` or None."""
    b, m = samples.shape[:2]
    dev = samples.device
    first = torch.randint(0, m, (b,), device=dev)
    second = (first + torch.randint(1, max(m, 2), (b,), device=dev)) % m
    global_views = _mask_sample(_pick(samples, torch.stack([first, second], 1)), global_keep)
    if not num_local:
        return global_views, None
    local = torch.randint(0, m, (b, num_local), device=dev)
    return global_views, _mask_sample(_pick(samples, local), local_keep)


def _logits(net: PeerNet, views: torch.Tensor) -> torch.Tensor:
    """views `[B, V, K, D]` -> logits `[V, B, out_dim]`."""
    b, v = views.shape[:2]
    return net(views.flatten(0, 1)).view(b, v, -1).transpose(0, 1)


def dino_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor,
              student_temp: float, teacher_temp: torch.Tensor) -> torch.Tensor:
    """`ops.dino_loss`: mean cross-entropy over every (teacher view, other student view) pair."""
    targets = F.softmax((teacher.float() - center) / teacher_temp, dim=-1)
    log_probs = F.log_softmax(student.float() / student_temp, dim=-1)
    cross = -torch.einsum("tbo,sbo->ts", targets, log_probs) / student.shape[1]
    not_same = 1.0 - torch.eye(*cross.shape, device=cross.device)
    return (cross * not_same).sum() / not_same.sum()


def teacher_entropy(teacher: torch.Tensor, center: torch.Tensor,
                    teacher_temp: torch.Tensor) -> torch.Tensor:
    """`ops.teacher_entropy`, the collapse metric our step also computes."""
    targets = F.softmax((teacher.float() - center) / teacher_temp, dim=-1)
    return -(targets * torch.log(targets + 1e-12)).sum(-1).mean()


class PeerStep:
    """Student, teacher, optimizer and centre on `device`; `run_steps(n)` runs n DINO steps.

    `samples_shape` is `[batch, M, K, D]`, the server's input.
    """

    def __init__(self, config, samples_shape: tuple[int, int, int, int], device: torch.device,
                 compiled: bool):
        torch.manual_seed(0)
        self.cfg, self.device, self.compiled = config.server, device, compiled
        # The JAX step's compute dtype: bf16 autocast (float32: no autocast).
        self.dtype = getattr(torch, config.model.dtype)
        cfg = self.cfg
        self.student = build_net(config).to(device)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        named = list(self.student.named_parameters())
        # DINO's rule, as the JAX step: decay all but biases and 1-D parameters.
        decay = [p for n, p in named if p.ndim >= 2 and not n.endswith(".bias")]
        no_decay = [p for n, p in named if not (p.ndim >= 2 and not n.endswith(".bias"))]
        self.opt = torch.optim.AdamW(
            [dict(params=decay, weight_decay=cfg.weight_decay),
             dict(params=no_decay, weight_decay=0.0)],
            lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, fused=device.type == "cuda")
        self.student_params = [p for _, p in named]
        self.teacher_params = list(self.teacher.parameters())
        self.center = torch.zeros(cfg.out_dim, device=device)
        self.teacher_temp = torch.zeros((), device=device)
        # Random tokens as the payload sends them (float16); the step casts them.
        self.samples = torch.randn(samples_shape, device=device, dtype=torch.float16)
        schedules = distill.make_schedules(cfg, total_steps=1000, steps_per_epoch=100)
        steps = jnp.arange(1001)
        self.table = {name: np.asarray(jax.vmap(fn)(steps)).tolist()
                      for name, fn in schedules._asdict().items()}
        self.forward = torch.compile(self._forward, dynamic=False) if compiled else self._forward
        self.step, self.loss, self.entropy, self.grad_norm = 0, None, None, None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def _forward(self, samples, center, teacher_temp):
        cfg = self.cfg
        global_views, local_views = make_views(samples.float(), cfg.global_keep, cfg.local_keep,
                                               cfg.num_local)
        with torch.autocast(self.device.type, dtype=self.dtype,
                            enabled=self.dtype != torch.float32):
            with torch.no_grad():
                teacher = _logits(self.teacher, global_views)
            student = _logits(self.student, global_views)
            if local_views is not None:
                student = torch.cat([student, _logits(self.student, local_views)], dim=0)
        loss = dino_loss(student, teacher, center, cfg.student_temp, teacher_temp)
        with torch.no_grad():
            entropy = teacher_entropy(teacher, center, teacher_temp)
        return loss, teacher, entropy

    def _one_step(self):
        cfg, i = self.cfg, min(self.step, len(self.table["learning_rate"]) - 1)
        decay_group, no_decay_group = self.opt.param_groups
        decay_group["lr"] = no_decay_group["lr"] = self.table["learning_rate"][i]
        decay_group["weight_decay"] = self.table["weight_decay"][i]
        self.teacher_temp.fill_(self.table["teacher_temp"][i])
        loss, teacher, self.entropy = self.forward(self.samples, self.center, self.teacher_temp)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.table["last_layer_frozen"][i]:  # AdamW then skips it, as DINO's freeze
            self.student.head.last_layer_v.grad = None
        # DINO's clipping, as the JAX step: each tensor to its own norm. (The peer has no
        # drop path, which the JAX student has: a difference in what the two steps compute.)
        norms = [p.grad.norm() for p in self.student_params if p.grad is not None]
        self.grad_norm = torch.linalg.vector_norm(torch.stack(norms))
        if cfg.clip_grad > 0:
            for p in self.student_params:
                if p.grad is not None:
                    p.grad.mul_(torch.clamp(cfg.clip_grad / (p.grad.norm() + 1e-6), max=1.0))
        self.opt.step()
        with torch.no_grad():
            momentum = self.table["teacher_momentum"][i]
            torch._foreach_lerp_(self.teacher_params, self.student_params, 1.0 - momentum)
            self.center.mul_(cfg.center_momentum).add_(
                teacher.float().mean(dim=(0, 1)), alpha=1.0 - cfg.center_momentum)
        self.step += 1
        self.loss = loss

    def run_steps(self, n: int) -> None:
        for _ in range(n):
            self._one_step()

    def sync(self) -> None:
        sync(self.device)

    def report(self) -> dict:
        loss = float(self.loss.detach())
        if not np.isfinite(loss):
            raise FloatingPointError(f"the peer's loss is {loss}")
        cuda = self.device.type == "cuda"
        return dict(loss=loss, teacher_entropy=float(self.entropy), compiled=self.compiled,
                    autocast=str(self.dtype),
                    optimizer="AdamW fused" if cuda else "AdamW",
                    peak_bytes=torch.cuda.max_memory_allocated(self.device) if cuda else None)

    def close(self) -> None:
        """Frees the peer's memory for whatever runs next (JAX's pool does not give back)."""
        for name in ("student", "teacher", "opt", "student_params", "teacher_params",
                     "samples", "center", "forward", "loss", "entropy", "grad_norm"):
            setattr(self, name, None)
        if self.compiled:
            torch._dynamo.reset()  # else each new shape counts towards the recompile limit
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

