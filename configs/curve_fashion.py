r"""The long learning curve on Fashion-MNIST: one single round of 16 epochs, probed as it goes.

    python -m launch.main --config=configs/curve_fashion.py --mode=curve   # resumes if stopped

The quickstart's consortium (all 60,000 train images over 4 Dirichlet sites, the privacy
default head, M = 2 samples of 24 tokens) sends its payloads once; the server trains one
schedule of 16 epochs, about 75 minutes of 2 CPU cores at the quickstart's rate (the whole
curve, probes included, under 2 hours), and its teacher is probed at epochs 1, 2, 4, 8 and 16
(linear probe and k-NN at 1% and 10% of the labels, fine-tuning at 1%), the last epoch with
2 fine-tuning seeds, beside raw pixels and the random body fine-tuned to convergence
(fine-tune only) with the same 2 seeds
(experiments/curve.py). Writes results/curve.{json,md,png} after every probe.

The recipe is the quickstart's (chosen in results/recipe.md: lecun init, no stochastic
depth, peak lr 5e-4), with the schedules set for a run of 16 epochs as DINO sets them for its
100: warm-up 10% of the run (1.6 epochs), the last layer frozen 1 epoch, the teacher's
momentum from 0.996 (the quickstart's 0.99 and 0.5-epoch warm-up are for its 2 epochs).
results/curve.* were measured before the recipe was chosen, with lecun init alone (stochastic
depth 0.1, peak lr 1e-3); the next run of this config measures the chosen one.

Variants: `:tiny` (seconds: the tests' size, epochs 1 and 2 of 2), `:runlocal` (a few
minutes: 4,000 images, epochs 1 and 3 of 3).
"""

from configs import base, quickstart


def _runlocal(c):
    c.curve.update(probe_epochs=(1, 3), seeds=(0,))
    c.server.update(warmup_epochs=0.3, freeze_last_layer_epochs=0.3, teacher_momentum=0.99)
    return c


def _tiny(c):
    c.curve.update(probe_epochs=(1, 2), seeds=(0, 1))
    c.server.update(epochs=2.0, warmup_epochs=0.0, freeze_last_layer_epochs=0.0,
                    teacher_momentum=0.99)
    c.downstream.update(label_fractions=(0.1, 0.5))
    return c


OWN = {"runlocal": _runlocal, "tiny": _tiny}
VARIANTS = base.variant_names(OWN)


def get_config(arg: str | None = None):
    c = base.demo_keys(quickstart.get_config())  # a study on public data: reproducible keys
    c.workdir = "runs/curve_fashion"
    c.server.update(epochs=16.0, warmup_epochs=1.6, freeze_last_layer_epochs=1.0,
                    teacher_momentum=0.996, checkpoint_every=500, log_every=50)
    c.curve = dict(
        probe_epochs=(1, 2, 4, 8, 16),  # stops of the one run, each probed
        seeds=(0, 1),  # downstream seeds: every probe with the first, the last epoch and
                       # the references (raw pixels, random body, fine-tune only) with each
        deadline_minutes=0.0,  # > 0: start no probe after this long (the next call resumes)
    )
    return base.apply_variants(c, arg, OWN, config=__file__)
