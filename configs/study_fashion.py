r"""The comparison study on Fashion-MNIST: SMSD against fine-tune only, FedAvg-DINO and
centralized DINO (`experiments/study.py` says what each run does).

    python -m launch.main --config=configs/study_fashion.py --mode=study   # resumes if stopped

Designed from the learning curve (results/curve.md): within 312 steps of pre-training no
method separated from the others or from the random body, while the quickstart's 936 steps
are past that early phase. So this study runs few, longer runs: the quickstart's data, sites,
head and DINO settings (all 60,000 train images over 4 Dirichlet alpha 0.5 sites, tested on
the 10,000 test images; ViT `small4` behind the default head of width 16), with 937 steps of
pre-training per method: one epoch of the pooled images at batch 64 for SMSD's server and
centralized DINO, 4 rounds x 1/4 local epoch for FedAvg-DINO (the same images seen).
Downstream: the quickstart's protocol (linear probe and k-NN at 1%, 10% and 100% of the
labels; fine-tuning to convergence at 1%). Seeds: SMSD, fine-tune only and raw pixels 0 and
1; the two image-DINO baselines (2.6x SMSD's FLOPs per image) seed 0. No ablations at this
budget (the privacy settings' accuracy is measured by `--mode=frontier`, results/frontier.md).
The recipe is the quickstart's (results/recipe.md); results/study.* were measured before it
was chosen, with DINO's init, stochastic depth 0.1 and a peak lr of 5e-4 at batch 64.
CPU budget (2 cores, under 90 minutes): planned at about an hour from the measured rates
(SMSD's server about 170 images/s with its pipeline, image DINO about 85). Measured on
2026-12-04, nearly alone: 54.6 min wall, 3.0 GB peak resident (results/study.md); on
2026-12-03, beside three other jobs, 111.8 min, with the same accuracies.

Variants (comma-separated after the file name, applied in the order given):
  `:gpu`       the full plan on a GPU: 3 seeds for every method, IID and Dirichlet sites,
               seven SMSD ablations, 100 epochs of server training (DINO's regime), batch
               512, bf16; one H100 (not yet measured here: run it in 8-minute commands; the
               study resumes, keeping finished runs);
  `:runlocal`  a short local run of the whole study: configs/base.py's runlocal sizes (3
               epochs, DINO out_dim 1024, 3 FedAvg rounds, the first 4,000 images), seed 0
               (a few minutes);
  `:tiny`      seconds: the tests' size (configs/base.py's tiny, then 1 seed, IID only, one
               ablation).
"""

from configs import base, quickstart

# Each changes one SMSD setting (`comparison.ablation_config`); run by the `gpu` variant.
ABLATIONS = ("keep=0.25", "keep=0.75", "keep=1.0", "no_permutation", "samples=1", "samples=4",
             "public_head")


def _gpu(c):
    c.workdir = "runs/study_fashion_gpu"
    c.model.update(dtype="bfloat16", init="dino")  # DINO's own recipe: made for 100 epochs
    c.site.update(num_samples=4, batch_size=2000, shard_size=16000)
    c.server.update(batch_size=512, epochs=100.0, warmup_epochs=10.0,
                    freeze_last_layer_epochs=1.0,
                    teacher_momentum=0.996, teacher_temp=0.04, teacher_temp_final=0.07,
                    teacher_temp_warmup_epochs=30.0, lr=1e-3, drop_path=0.1, log_every=100,
                    checkpoint_every=2000)
    c.baselines.update(rounds=10, local_epochs=10.0)
    c.downstream.update(finetune_fractions=(0.01, 0.1, 1.0), batch_size=256,
                        eval_batch_size=2000)
    c.study.update(seeds=(0, 1, 2), image_dino_seeds=(0, 1, 2),
                   partitions=("iid", "dirichlet"), ablations=ABLATIONS,
                   ablation_finetune=True)
    return c


def _runlocal(c):
    c.server.update(batch_size=64)
    c.study.update(seeds=(0,), image_dino_seeds=(0,))
    return c


def _tiny(c):
    c.data.subset = 256
    c.server.update(batch_size=16, epochs=1.0)
    c.baselines.update(rounds=1, local_epochs=1.0, local_size=16)
    c.downstream.update(label_fractions=(0.1, 1.0), finetune_fractions=(0.1, 1.0),
                        finetune_epochs=2, finetune_max_steps=4, batch_size=16)
    c.study.update(seeds=(0,), image_dino_seeds=(0,), partitions=("iid",),
                   ablations=("no_permutation",), ablation_partition="iid")
    return c


OWN = {"gpu": _gpu, "runlocal": _runlocal, "tiny": _tiny}
VARIANTS = base.variant_names(OWN)


def get_config(arg: str | None = None):
    c = base.demo_keys(quickstart.get_config())  # its data, sites, head, DINO settings; demo keys
    c.workdir = "runs/study_fashion"
    # 937 steps, as many as the quickstart's, at half its batch: one epoch of the pooled
    # images. Warm-up and the frozen last layer keep the quickstart's tenth of the steps.
    c.server.update(batch_size=64, epochs=1.0, warmup_epochs=0.1,
                    freeze_last_layer_epochs=0.1, checkpoint_every=200, log_every=50)
    c.baselines.update(rounds=4, local_epochs=0.25, num_local=c.server.num_local,
                       local_size=16)
    c.downstream.update(label_fractions=(0.01, 0.1, 1.0), finetune_fractions=(0.01,))
    c.study = dict(
        seeds=(0, 1),             # SMSD, fine-tune only and raw pixels
        image_dino_seeds=(0,),    # FedAvg-DINO and centralized DINO (the costly baselines)
        partitions=("dirichlet",),
        methods=("smsd", "fedavg_dino", "centralized_dino", "finetune_only"),
        ablations=(),
        ablation_seed=0,
        ablation_partition="dirichlet",
        ablation_finetune=False,  # ablations: linear probe and k-NN only (saves CPU time)
        pixels=True,  # raw-pixel linear probe and k-NN as a reference row
        # A results/study.json whose runs of the same config are taken, not run again (a
        # study spread over machines or days); empty: none.
        resume_from="",
    )
    return base.apply_variants(c, arg, OWN, config=__file__)
