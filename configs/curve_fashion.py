r"""The learning curve on Fashion-MNIST: when does the single round pay, on this machine?

    python -m launch.main --config=configs/curve_fashion.py --mode=curve   # resumes if stopped

SMSD, centralized DINO and FedAvg-DINO each pre-train the quickstart's ViT (`small4`, patch
4, the quickstart's DINO settings) for 1, 2, 4 and 8 epochs of images seen (a full schedule
per budget), on the first 5,000 train images over 4 Dirichlet (alpha 0.5) sites; their
teachers are probed with a linear probe and k-NN at 1% and 10% of the labels, tested on the
first 5,000 test images. SMSD: 2 seeds; the baselines, raw pixels, the random body and
fine-tune only (trained to convergence on the same labels): seed 0.
CPU budget: planned at under an hour on 2 free cores from the measured rates (SMSD's server
about 230 images/s, image DINO about 90 images/s at 2.6x the FLOPs per image): 15 epochs of
5,000 images per method and seed. Measured on 2026-12-02: 125.5 min beside the test suite and
the quickstart (results/curve.md). Its longest budget is 312 steps of 128, inside DINO's
early phase (README, "When does the single round pay?"). Writes
results/curve.{json,md,png}; the measured time is in curve.md.

Variants (comma-separated after the file name, applied in the order given):
  `:runlocal`  configs/base.py's runlocal, then budgets 1 and 2 on the first 4,000 images, one
               seed (a few minutes);
  `:tiny`      seconds: the tests' size (configs/base.py's tiny, budgets 1 and 2, SMSD only,
               one seed).
"""

from configs import base, quickstart


def _runlocal(c):
    c.site.batch_size = 500  # base's runlocal 256 does not divide the 5,000-image shards
    c.curve.update(budgets=(1, 2), smsd_seeds=(0,), baseline_seeds=(0,))
    c.data.subset = 4000
    return c


def _tiny(c):
    c.server.update(batch_size=16)
    c.downstream.update(label_fractions=(0.1, 0.5), batch_size=16)
    c.curve.update(budgets=(1, 2), methods=("smsd",), smsd_seeds=(0,), baseline_seeds=(0,),
                   partition="iid")
    return c


OWN = {"runlocal": _runlocal, "tiny": _tiny}
VARIANTS = base.variant_names(OWN)


def get_config(arg: str | None = None):
    c = base.demo_keys(quickstart.get_config())  # a study on public data: reproducible keys
    c.workdir = "runs/curve_fashion"
    c.model.update(base.WIDE_PLACED_HEAD)  # results/curve.* were measured with it
    c.data.update(subset=5000, num_sites=4, alpha=0.5)
    c.site.update(batch_size=500, shard_size=5000)
    c.server.update(checkpoint_every=1000, log_every=20)
    c.baselines.update(num_local=c.server.num_local, local_size=16)
    c.downstream.update(label_fractions=(0.01, 0.1))
    c.curve = dict(
        budgets=(1, 2, 4, 8),      # epochs of images seen; a full schedule each
        methods=("smsd", "centralized_dino", "fedavg_dino"),
        smsd_seeds=(0, 1),
        baseline_seeds=(0,),       # also raw pixels, the random body, fine-tune only
        partition="dirichlet",
    )
    return base.apply_variants(c, arg, OWN, config=__file__)
