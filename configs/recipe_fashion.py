r"""The recipe for the CPU budgets: single-change ablations from the quickstart (seed 0).

    python -m launch.main --config=configs/recipe_fashion.py --mode=recipe   # resumes

Each setting is the quickstart's single round (configs/quickstart.py, public demo keys: the
same split, head and keys for every setting) with one change: the body's init, stochastic
depth, the number of local views and their keep (at the reference's compute: fewer epochs
for a costlier step, experiments/recipe.py), samples per image M, the teacher's momentum and
temperature, the learning rate and its warm-up, the last layer's freeze. Probes of each
teacher (linear and k-NN at 1% and 10% of the labels); the reference and the random bodies
also fine-tuned at 1%. Then the recipe chosen from them (`--config.recipe.chosen="<overrides>"`)
on 3 seeds, each beside its random body and raw pixels, all fine-tuned. Writes
results/recipe.{json,md,png}. CPU: about 12 minutes a setting on 2 cores; run it as a
background job, in parts if need be (`deadline_minutes`, `resume_from` below).

Variants: `:runlocal` (a minute a setting), `:tiny` (seconds; the tests' size: three
settings on 256 images).
"""

import ml_collections

from configs import base, quickstart


def _tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    c.recipe.update(settings=(("reference", ""), ("lecun", "model.init=lecun"),
                              ("local4", "server.num_local=4")), equal_compute=("local4",),
                    chosen="model.init=lecun server.num_local=4", chosen_seeds=(0, 1))
    return c


OWN = {"tiny": _tiny}
VARIANTS = base.variant_names(OWN)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base.demo_keys(quickstart.get_config())  # a study on public data: reproducible keys
    c.workdir = "runs/recipe_fashion"
    # The reference is the quickstart before the recipe was chosen (DINO's init, stochastic
    # depth 0.1, peak lr 1e-3, warm-up 0.2 epoch): the ablations were measured from it.
    c.model.init = "dino"
    c.server.update(drop_path=0.1, lr=2e-3, warmup_epochs=0.2)
    c.recipe = dict(
        seed=0,
        partition="dirichlet",
        # (name, overrides), each applied alone to the first (the reference).
        settings=(
            ("reference", ""),
            ("lecun_init", "model.init=lecun"),
            ("local6", "server.num_local=6"),
            ("no_freeze", "server.freeze_last_layer_epochs=0.0"),
            ("no_drop_path", "server.drop_path=0.0"),
            ("lr_4e-3", "server.lr=4e-3"),
            ("lr_1e-3", "server.lr=1e-3"),
            ("samples4", "site.num_samples=4"),
            ("local10", "server.num_local=10"),
            ("local_keep_0.4", "server.local_keep=0.4"),
            ("teacher_momentum_0.996", "server.teacher_momentum=0.996"),
            ("teacher_temp_0.07", "server.teacher_temp_final=0.07"),
            ("warmup_0.5", "server.warmup_epochs=0.5"),
        ),
        # Settings whose step costs more than the reference's: run at its compute.
        equal_compute=("local6", "local10", "local_keep_0.4"),
        deadline_minutes=0.0,  # > 0: start no run after this long (the next call resumes)
        # A results/recipe.json whose runs of the same config are taken, not run again (a
        # recipe spread over machines or days); empty: none.
        resume_from="",
        # The recipe chosen from the ablations (overrides of the reference, all at once) and
        # the seeds it is confirmed on, each beside its random body and raw pixels; "": none
        # chosen yet.
        chosen="",
        chosen_seeds=(0, 1, 2),
    )
    return base.apply_variants(c, arg, OWN, config=__file__)
