r"""The privacy-utility frontier on Fashion-MNIST: what each privacy setting costs in accuracy,
beside what an honest-but-curious server's attacks recover from it.

    python -m launch.main --config=configs/frontier_fashion.py --mode=frontier  # resumes

Utility: each setting runs the quickstart's single round (all 60,000 train images over 4
Dirichlet sites, 2 server epochs = 936 steps of 128, seed 0; configs/quickstart.py) with its
overrides, then probes the teacher (linear probe and k-NN at 1% and 10% of the labels) and
fine-tunes at 1%, tested on the 10,000 test images. Privacy: the attacks of
configs/privacy_fashion.py (2,000 train images attacked, 4,000 test images public) on a
payload made with the same head width, position std, keep and noise.
Settings: the head width D (128, the default before 2026-12-03, then 16 = the values of a 4x4
grayscale patch, 8 and 32); around D 16: token noise, keep, position std, the Gaussian
mechanism at epsilon 9.9 per image (delta 1e-5), faint patches unplaced as well as blank ones,
no position embedding. CPU budget: about 15 min a setting on 2 free cores (the quickstart's
time), so about 3 hours for all; run it as a background job, or in parts:
`--config.frontier.deadline_minutes=M` stops starting settings after M minutes, and
`--config.frontier.resume_from=results/frontier.json` (a copy of the results of an earlier
part) takes the settings done there. Writes results/frontier.{json,md,png}.

Variants (comma-separated after the path, applied in order): `:runlocal` (configs/base.py's
runlocal: the first 4,000 images, 3 server epochs; minutes a setting), `:tiny` (seconds: the
tests' size; two settings), `:seed1` (seed 1 of d128 and d16_unplaced, the reference and the
default: 35 min measured; writes to runs/frontier_fashion_seed1).
"""

import ml_collections

from configs import base, privacy_fashion, quickstart


def _tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    c.privacy = privacy_fashion.get_config("tiny").privacy
    c.frontier.settings = (("d_default", ""), ("d8_noise", "model.head_dim=8 site.token_noise=0.5"))
    c.downstream.update(label_fractions=(0.5,), finetune_fractions=(0.5,))
    return c


def _seed1(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A second seed (data split, label subsets, head, init and keys) of the reference and
    of the default it chose, so that their difference has a spread."""
    c.workdir = "runs/frontier_fashion_seed1"
    c.frontier.seed = 1
    keep = ("d128", "d16_unplaced")
    c.frontier.settings = tuple(s for s in c.frontier.settings if s[0] in keep)
    return c


OWN = {"tiny": _tiny, "seed1": _seed1}
VARIANTS = base.variant_names(OWN)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base.demo_keys(quickstart.get_config())  # a study on public data: reproducible keys
    c.workdir = "runs/frontier_fashion"
    # The reference every setting's overrides start from, whatever the quickstart's default.
    c.model.update(base.WIDE_PLACED_HEAD)
    c.privacy = privacy_fashion.get_config().privacy
    c.frontier = dict(
        seed=0,
        partition="dirichlet",
        # (name, overrides): one point each; the first is the reference the others are read
        # against.
        # In the order they run (a frontier stopped part-way holds the first): the reference,
        # the default, the defences, then the head's width.
        settings=(
            ("d128", ""),
            # The defence against blank-patch anchors (docs/threat_model.md): the default.
            ("d16_unplaced", "model.head_dim=16 model.constant_patches=unplaced"),
            ("d16_pos0.1", "model.head_dim=16 model.pos_std=0.1"),
            ("d16_noise0.5", "model.head_dim=16 site.token_noise=0.5"),
            # Clip 4 is about a D-16 token's norm; multiplier 7: epsilon 9.9 at delta 1e-5.
            ("d16_dp_eps9.9", "model.head_dim=16 site.dp_clip=4.0 site.dp_noise_multiplier=7.0"),
            # Beyond the blanks: faint patches (values within 0.3) unplaced too; no position
            # embedding at all (the tokens carry content alone).
            ("d16_blank0.3", "model.head_dim=16 model.constant_patches=unplaced "
                             "model.blank_range=0.3"),
            ("d16_nopos", "model.head_dim=16 model.pos_std=0.0"),
            ("d16_keep0.25", "model.head_dim=16 site.keep=0.25"),
            ("d16", "model.head_dim=16"),
            ("d8", "model.head_dim=8"),
            ("d32", "model.head_dim=32"),
        ),
        deadline_minutes=0.0,  # > 0: start no setting after this long (the next call resumes)
        # A results/frontier.json whose settings of the same config are taken, not run again
        # (a frontier spread over machines or days); empty: none.
        resume_from="",
    )
    return base.apply_variants(c, arg, OWN, config=__file__)
