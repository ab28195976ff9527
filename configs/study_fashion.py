r"""The comparison study on Fashion-MNIST: SMSD against fine-tune only, FedAvg-DINO and
centralized DINO, with ablations (`smsd_jax/study/comparison.py` says what each run does).

    python -m launch.main --config=configs/study_fashion.py --mode=study

CPU budget (2 cores, under 90 minutes: 68 min measured on 2026-11-26, part of it beside
other jobs; results/study.md): the first 4,000 train images over 4 sites (IID, and Dirichlet
alpha 0.5), tested on the first 4,000 test images. ViT `small4` (width 128, depth 4, 4 heads,
patch 4: 49 tokens), the quickstart's DINO settings; 2 epochs of the pooled images at batch 64
(124 steps) for SMSD's server and centralized DINO, 2 rounds x 1 local epoch for
FedAvg-DINO. Downstream: linear probe and
k-NN at 1%, 10%, 100% of the 4,000 labels; fine-tuning at the same fractions for at most 50
steps of 64 images. SMSD and the baselines: 3 seeds; ablations: 1 seed, Dirichlet sites,
linear probe and k-NN only.
At this budget self-supervision has barely started (docs/method.md, "Reference result"): the
CPU study checks the machinery and the costs; the `gpu` variant is the one whose accuracies
matter.

Variants (comma-separated after the file name, applied in the order given):
  `:gpu`       all 60,000 images, 100 epochs of server training (DINO's regime), batch 512,
               bf16; one H100 (not yet measured here: run it in 8-minute commands; the study
               resumes, keeping finished runs);
  `:runlocal`  a short local run of the whole study: configs/base.py's runlocal sizes (3
               epochs, DINO out_dim 1024, 3 FedAvg rounds, the first 4,000 images) with the
               study's site batch of 500 (a divisor of its 4,000-image shards), and the
               study's fewest runs: seed 0, Dirichlet sites only, one ablation
               (no_permutation): 6 runs instead of 31 (not yet timed);
  `:tiny`      seconds: the tests' size (configs/base.py's tiny, then 1 seed, IID only, one
               ablation).
"""

from configs import base


def _gpu(c):
    c.workdir = "runs/study_fashion_gpu"
    c.data.subset = 0
    c.model.dtype = "bfloat16"
    c.site.update(num_samples=4, batch_size=2000, shard_size=16000)
    c.server.update(batch_size=512, epochs=100.0, warmup_epochs=10.0,
                    teacher_momentum=0.996, teacher_temp=0.04, teacher_temp_final=0.07,
                    teacher_temp_warmup_epochs=30.0, lr=1e-3, log_every=100,
                    checkpoint_every=2000)
    c.baselines.update(rounds=10, local_epochs=10.0)
    c.study.ablation_finetune = True
    c.downstream.update(finetune_epochs=100, finetune_max_steps=2000, batch_size=256,
                        eval_batch_size=2000)
    return c


def _runlocal(c):
    # configs/base.py's runlocal sets site.batch_size 256, which does not divide the study's
    # 4,000-image shards; keep the study's 500.
    c.site.batch_size = 500
    c.study.update(seeds=(0,), partitions=("dirichlet",), ablations=("no_permutation",),
                   ablation_partition="dirichlet")
    return c


def _tiny(c):
    c.data.subset = 256
    c.server.update(batch_size=16, epochs=1.0)
    c.baselines.update(rounds=1, local_epochs=1.0, local_size=16)
    c.downstream.update(label_fractions=(0.1, 1.0), finetune_fractions=(0.1, 1.0),
                        finetune_epochs=2, finetune_max_steps=4, batch_size=16)
    c.study.update(seeds=(0,), partitions=("iid",), ablations=("no_permutation",),
                   ablation_partition="iid")
    return c


OWN = {"gpu": _gpu, "runlocal": _runlocal, "tiny": _tiny}
VARIANTS = base.variant_names(OWN)


def get_config(arg: str | None = None):
    c = base.get_config()
    c.workdir = "runs/study_fashion"
    c.model.update(base.HEAD_BEFORE_2026_12_03)  # results/study.* were measured with it
    # Reproducible heads and site keys; the study offsets both by the seed.
    c.consortium_seed = 2026
    c.site.secret_seed = 1000
    c.data.update(subset=4000, num_sites=4, alpha=0.5)
    c.site.update(keep=0.5, num_samples=2, batch_size=500, shard_size=4000)
    # The quickstart's short-run DINO settings (configs/quickstart.py says why).
    c.server.update(batch_size=64, epochs=2.0, out_dim=1024, hidden_dim=512,
                    bottleneck_dim=256, num_local=2, lr=4e-3, warmup_epochs=0.2,
                    freeze_last_layer_epochs=0.2,
                    teacher_momentum=0.99, teacher_temp=0.04, teacher_temp_final=0.04,
                    checkpoint_every=1000, log_every=20)
    c.baselines.update(rounds=2, local_epochs=1.0, num_local=2, local_size=16)
    c.downstream.update(label_fractions=(0.01, 0.1, 1.0), finetune_fractions=(0.01, 0.1, 1.0),
                        finetune_epochs=50, finetune_max_steps=50, batch_size=64,
                        linear_steps=500)
    c.study = dict(
        seeds=(0, 1, 2),
        partitions=("iid", "dirichlet"),
        methods=("smsd", "fedavg_dino", "centralized_dino", "finetune_only"),
        ablations=("keep=0.25", "keep=0.75", "keep=1.0", "no_permutation", "samples=1",
                   "samples=4", "public_head"),
        ablation_seed=0,
        ablation_partition="dirichlet",
        ablation_finetune=False,  # ablations: linear probe and k-NN only (saves CPU time)
        pixels=True,  # raw-pixel linear probe and k-NN as a reference row
    )
    return base.apply_variants(c, arg, OWN, config=__file__)
