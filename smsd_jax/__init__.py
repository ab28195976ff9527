"""smsd_jax: single-round self-supervised masked sampling distillation for Vision Transformers.

The method, in the order it runs (docs/method.md):

    consortium.py   set-up: the frozen secret head, the sites' split of the data, site keys
                    (keys.py: 128 bits from the OS, or public demo keys)
    site.py         stage 1 at each site, once: head, masked sampling, permutation -> payload
    payload.py      what a site uploads, and the server's reading of all of them
    distill.py      the pure masked-distillation step (DINO between masked views)
    server.py       stage 2 at the server: the trainer (checkpoints.py, metrics_log.py),
                    ending with the body's export (export.py)
    downstream/     stage 3 at each site: head + body + tail; linear probe, k-NN, fine-tuning
                    (probes, features, finetune, protocol, stage); masks (segmentation.py);
                    every site on its own labels and held-out images (per_site.py)
    tasks.py        stage 3 on several tasks (single-label, multi-label, masks) at once
    simulate.py     all of it for every site on one machine

`smsd_jax.ops` (pure functional ops) and `smsd_jax.models` (Flax modules) are what other
JAX code imports; they load jax, flax, optax and numpy only. Keys are `keys.py`'s, costs
(FLOPs, bytes) `cost.py`'s. The baselines are in `smsd_jax.baselines`, the attacks on payloads
and the differential-privacy accountant in `smsd_jax.privacy`. The experiments that study
the method (the comparison, the learning curve, the privacy audit, the frontier, per-site
heads) run from a checkout: experiments/.
"""

__version__ = "0.1.0"
