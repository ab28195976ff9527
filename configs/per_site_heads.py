r"""Per-site heads against one shared head, on Fashion-MNIST: the accuracy a head of its own at
every site costs, and what one leaked head then reveals.

    python -m launch.main --config=configs/per_site_heads.py --mode=per_site_heads   # resumes

Two quickstart rounds (configs/quickstart.py: all 60,000 train images over 4 Dirichlet sites,
2 server epochs = 936 steps of 128, seed 0): one with the consortium's shared head, one with
`model.per_site_heads` (each site's head drawn from the consortium seed folded with the site;
a stem per site at the server). Then the server is handed each site's head in turn and
attacks every site's payload on disk (its first 500 images, both samples), directly and
through its own trained stems (experiments/per_site_heads.py). CPU budget: two quickstart
rounds (about 12 min each on 2 free cores) and about 2 min of probes and attacks. Writes
results/per_site_heads.{json,md,png} under the work directory.

Variants (comma-separated after the path, applied in order): `:runlocal` and `:tiny`
(configs/base.py's, with fewer images attacked and a smaller public prior).
"""

import ml_collections

from configs import base, quickstart


def _small(images: int, public: int):
    def variant(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        c.heads.update(images_per_site=images, num_public=public)
        return c
    return variant


OWN = {"runlocal": _small(200, 1000), "tiny": _small(24, 200)}
VARIANTS = base.variant_names(OWN)


def get_config(arg: str | None = None):
    c = base.demo_keys(quickstart.get_config())  # a study on public data: reproducible keys
    c.workdir = "runs/per_site_heads"
    # images_per_site: each site's first images attacked (every sample of each); num_public:
    # test images the server fits its patch prior on; prior_ridge: that prior's ridge.
    c.heads = dict(images_per_site=500, num_public=4000, prior_ridge=1e-2)
    return base.apply_variants(c, arg, own=OWN, config=__file__)
