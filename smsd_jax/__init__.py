"""smsd_jax: single-round self-supervised masked sampling distillation for Vision Transformers.

The method, in the order it runs (docs/method.md):

    consortium.py   set-up: the frozen secret head, the sites' split of the data, site keys
    site.py         stage 1 at each site, once: head, masked sampling, permutation -> payload
    payload.py      what a site uploads, and the server's reading of all of them
    distill.py      the pure masked-distillation step (DINO between masked views)
    server.py       stage 2 at the server: the trainer (checkpoints.py, metrics_log.py),
                    ending with the body's export (export.py)
    downstream.py   stage 3 at each site: head + body + tail; linear probe, k-NN, fine-tuning
    segmentation.py stage 3 for masks: a linear tail per patch token, Dice + cross-entropy
    per_site.py     stage 3 at every site on its own labels and its own held-out images
    tasks.py        stage 3 on several tasks (single-label, multi-label, masks) at once
    simulate.py     all of it for every site on one machine

`smsd_jax.ops` (pure functional ops) and `smsd_jax.models` (Flax modules) are what other
JAX code imports. The baselines are in `smsd_jax.baselines`, the experiments in
`smsd_jax.study` (SMSD against the baselines) and `smsd_jax.privacy` (attacks on payloads).
"""

__version__ = "0.1.0"
