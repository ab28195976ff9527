"""Defaults shared by every experiment; experiment configs start from `base.get_config()`.

Not an experiment itself: it trains the built-in data with the method's default choices
(docs/method.md, "Choices this project makes").

It also holds the one parser of config variants, the `:runlocal,tiny` after a config's path
(`apply_variants`), which every config in configs/ uses. The common variants `runlocal` and
`tiny` exist for every config; a config adds its own or refines a common one.

Variants (comma-separated after the path, applied in the order given):
  `:runlocal`  shrinks everything to a minute on a laptop CPU;
  `:tiny`      to seconds (tests).
"""

from collections.abc import Callable, Mapping
from pathlib import Path

import ml_collections

from smsd_jax.errors import SMSDError

Variant = Callable[[ml_collections.ConfigDict], ml_collections.ConfigDict]


# The wide head: tokens at the body's width (D 128 at small4) and blank patches placed, the
# default before the narrow privacy default. The configs whose results were measured with it
# pin it, so that their tables reproduce: `c.model.update(base.WIDE_PLACED_HEAD)`.
WIDE_PLACED_HEAD = dict(head_dim=0, constant_patches="placed")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = "runs/default"
    # The consortium key the head is drawn from: -1 draws 128 bits from the OS (what a real
    # consortium does). A fixed value is a public demo key: only through `demo_keys` (the
    # quickstart's variant, the studies' configs), for reproducible simulations on public
    # data (smsd_jax/keys.py).
    c.consortium_seed = -1

    # Data: the built-in real data set (Debian's dataset-fashion-mnist), or a user's.
    c.data = dict(
        source="fashion_mnist",  # fashion_mnist | medmnist | folder | tfds | mask_folder | nifti
        path="",                 # .npz (medmnist), folder root (folder), data_dir (tfds)
        labels_csv="",           # folder: CSV with columns path,label (train split; multilabel:
                                 # path and one column per finding)
        test_labels_csv="",      # folder: the same for the held-out test split
        tfds_name="",
        # single_label (one class per image) | multilabel (F binary findings per image, some
        # unknown: a MedMNIST .npz with [N, F] 0/1 labels, like ChestMNIST, or a folder whose
        # CSV has a path column and one column per finding, CheXpert/NIH-style). Multi-label
        # probes use per-finding sigmoids and report mean AUC; sites must be iid.
        task="single_label",
        finding_names=(),        # multilabel: the findings' names (npz) or the CSV's finding
                                 # columns, in order; (): finding_0, ... / every column but path
        uncertain="ignore",      # multilabel CSV, a -1 cell: ignore (masked out of loss and
                                 # metrics) | zeros | ones; an empty cell is 0 (not mentioned)
        # segmentation (a class per pixel, 0 the background; for site splits an image's label
        # is its most frequent structure), from mask_folder (path / test_path: folders of
        # images/ and masks/, a PNG of class ids per image) or nifti (path: a 3-D scan; atlas:
        # labels on its grid, sliced along slice_axis; the slices in test_block, fractions of
        # the labelled ones, are the test split, slice_gap slices each side of it unused;
        # configs/segment_mri.py).
        test_path="",
        class_names=(),          # segmentation: every class, background first
        atlas="", atlas_labels="",  # nifti: label volume; its "index name" file
        label_groups=(),         # nifti: ((class, prefixes of atlas region names), ...) in
                                 # class order; (): the atlas's values are the classes
        slice_axis=0, test_block=(0.5, 1.0), slice_gap=3,
        image_size=28,
        channels=1,
        mean=0.286, std=0.353,   # pixel normalisation after scaling to [0, 1]
        num_sites=4,
        partition="dirichlet",   # iid | dirichlet | label (by class: single_label only)
        alpha=0.5,
        subset=0,                # > 0: use only the first `subset` training images
    )

    # The frozen head every site shares; the server never sees it. head_dim: the width of the
    # tokens it makes; 0: the body's width (model.size's), no stem; > 0: the body learns a
    # per-token linear stem from head_dim to its width (docs/method.md, "Head and model").
    # constant_patches "unplaced": a blank patch (values all equal: blank background) is sent
    # without its position (models.ViTHead; docs/threat_model.md says what it hides);
    # blank_range > 0: patches whose values span at most that much (in [0, 1] pixels) count
    # as blank too, so no almost blank patch is sent with its position.
    # The default, from the privacy-utility frontier (results/frontier.md): tokens no wider
    # than the values of a patch (16 for 4x4 grayscale) and blank patches unplaced.
    # per_site_heads: each site draws its own secret head, kept at the site, and the body
    # learns one stem per site (needs head_dim > 0); a leaked head then opens one site's
    # payload, not every site's (docs/threat_model.md, results/per_site_heads.md).
    # init: the body's weight matrices at init, "dino" (trunc_normal 0.02) or "lecun" (Flax's
    # lecun_normal; models.INITS).
    c.model = dict(size="small4", patch_size=4, pos_std=0.5, dtype="float32", attention="",
                   head_dim=16, constant_patches="unplaced", blank_range=0.0,
                   per_site_heads=False, init="dino")

    # Stage 1: each site encodes its images once.
    c.site = dict(
        keep=0.5,            # fraction of the N patch tokens sent
        num_samples=2,       # M encrypted samples per image
        augment=dict(flip=True, max_shift=2, contrast=0.2),
        batch_size=512,
        shard_size=8192,     # images per payload shard
        payload_dtype="float16",
        permute=True,        # False: no permutation (an ablation; hides nothing)
        secret_seed=-1,      # -1: drawn from the OS once, kept at the site; >= 0: site k
                             # uses secret_seed + k (reproducible simulations only)
        # Noise on the sent tokens, fresh per value (docs/threat_model.md); at most one kind.
        token_noise=0.0,     # > 0: std token_noise * ops.token_scale(head) (no guarantee)
        dp_clip=0.0,         # > 0: differential privacy: each token clipped to this L2 norm,
        dp_noise_multiplier=0.0,  # then noise of std dp_noise_multiplier * dp_clip (> 0)
        dp_delta=1e-5,       # the delta the payload's per-image epsilon is given at
    )

    # Stage 2: central distillation.
    c.server = dict(
        batch_size=128, epochs=2.0,
        global_keep=0.75, local_keep=0.25, num_local=4,
        out_dim=65536, hidden_dim=2048, bottleneck_dim=256, norm_last_layer=True,
        # DINO's linear scaling rule: `lr` is the peak rate at a global batch of 256; the run
        # peaks at lr * batch_size / 256 (after warm-up). `min_lr`, the end of the cosine, is
        # used as given (not scaled), as in DINO.
        lr=5e-4, min_lr=1e-6, warmup_epochs=0.2,
        weight_decay=0.04, weight_decay_end=0.4,
        clip_grad=3.0,       # each gradient tensor clipped to this L2 norm (DINO's); 0: none
        freeze_last_layer_epochs=1.0,  # DINO head's last layer frozen this long (DINO's 1)
        drop_path=0.1,       # the student's stochastic depth rate (DINO's); the teacher: none
        student_temp=0.1, teacher_temp=0.04, teacher_temp_final=0.07,
        teacher_temp_warmup_epochs=0.5,
        teacher_momentum=0.996, center_momentum=0.9,
        num_devices=0,       # 0: every visible device
        fsdp=False, checkpoint_every=200, log_every=20, keep_checkpoints=2,
        collapse_patience=200,
        skip_bad_sites=False,  # True: warn about a damaged payload and train without it
        # Batches the input pipeline reads ahead from the payloads on disk (one thread); the
        # server holds at most these and the one training (smsd_jax/payload.py). 0: none.
        prefetch=4,
    )

    # Baselines (smsd_jax/baselines): image DINO on raw images, federated or pooled. Its
    # DINO hyperparameters and batch size are config.server's, so the methods are matched.
    c.baselines = dict(
        rounds=2,                  # FedAvg-DINO rounds R (R x local_epochs = server.epochs)
        local_epochs=1.0,          # E: epochs over its own images each site runs per round
        global_scale=(0.4, 1.0),   # area fraction of an image in a global crop (min, max)
        local_scale=(0.05, 0.4),   # the same for a local crop
        local_size=16,             # side in pixels of a local crop; a multiple of patch_size
        num_local=-1,              # local crops per image; -1: server.num_local
        flip=True,                 # mirror each crop left-right with probability 1/2
        contrast=0.2,              # each crop's contrast scaled by 1 +- up to this
    )

    # Stage 3: what a site does with the body it gets back.
    c.downstream = dict(
        label_fractions=(0.01, 0.1),
        site=-1,             # -1: a labelled site drawn from the whole train split
        batch_size=64,       # fine-tuning; 256 gives 600 labels 2 steps an epoch, too few
        knn_k=20,            # at most a tenth of the labelled set (downstream.knn_neighbours)
        knn_temp=0.07,
        linear_steps=500, linear_lr=1e-2,
        # What the linear probe reads (models.LINEAR_FEATURES): "dino" is DINO's rule by
        # body size (the last 4 blocks' class tokens below ViT-B's width, the class token
        # and mean patch token from it); "cls" the final class token, which k-NN reads.
        linear_features="dino",
        # Fine-tuning, every body alike: the epoch of the best validation accuracy is tested.
        # 60 epochs: from a random init at 1% of Fashion-MNIST (540 train + 60 validation
        # images, batch 64), validation flattens by epoch 40-50 and 100 epochs do no better.
        finetune_epochs=60, finetune_lr=5e-4, finetune_fractions=(0.01,),
        finetune_val_fraction=0.1,  # of each class (>= 1 if it has 2), held out; 0: none
        finetune_patience=20,  # stop after this many epochs without a better one; 0: never
        # A small labelled set trains at least this many steps (epochs and patience scaled
        # together): 50 labels are 1 step an epoch, and 60 steps stop far from converged.
        finetune_min_steps=500,
        finetune_max_steps=0,  # > 0: at most this many fine-tuning steps (a budget cap)
        eval_batch_size=1000,
        # Segmentation (data.task): a linear tail per patch on frozen token features, trained
        # with Dice + cross-entropy on every labelled training image
        # (smsd_jax/downstream/segmentation.py).
        segment_steps=500, segment_lr=1e-2,
        # --mode=downstream_per_site: each site holds out this share of each class of its own
        # images as its own test set, and labels from the rest
        # (smsd_jax/downstream/per_site.py).
        site_test_fraction=0.2,
        # Several tasks for one body: name -> {"data": {...}, "downstream": {...}}, overrides
        # of config.data and config.downstream for that task (smsd_jax/tasks.py; example:
        # configs/cxr_tasks.py). Empty: config.data is the one task.
        tasks={},
    )
    return apply_variants(c, arg, config=__file__)


def _runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A minute on a laptop CPU."""
    # A short run needs a teacher that follows faster and sharpens harder than
    # DINO's long-run defaults, or it stays uniform (see configs/quickstart.py).
    c.server.update(epochs=3.0, out_dim=1024, hidden_dim=512, checkpoint_every=50,
                    log_every=5, teacher_momentum=0.99, teacher_temp=0.04,
                    teacher_temp_final=0.04, warmup_epochs=0.3)
    c.site.update(num_samples=2, batch_size=256)
    c.downstream.update(linear_steps=200, finetune_epochs=2, finetune_min_steps=0)
    c.baselines.update(rounds=3, local_epochs=1.0)
    c.data.subset = 4000
    return c


def _tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Seconds: the tests' size."""
    c.model.size = "tiny"
    # lr 8e-3 at batch 16 is a peak of 5e-4 (DINO's scaling from 256); a one-epoch run
    # cannot spare an epoch of frozen last layer.
    c.server.update(batch_size=16, epochs=1.0, out_dim=64, hidden_dim=32,
                    bottleneck_dim=16, num_local=2, checkpoint_every=10, log_every=2,
                    warmup_epochs=0.0, lr=8e-3, freeze_last_layer_epochs=0.0)
    c.site.update(batch_size=64, shard_size=128)
    c.baselines.update(rounds=1, local_epochs=1.0)
    c.downstream.update(label_fractions=(0.5,), linear_steps=20, finetune_epochs=1,
                        finetune_fractions=(0.5,), batch_size=32, eval_batch_size=100,
                        knn_k=5, finetune_min_steps=0)
    c.data.subset = 256
    return c


def demo_keys(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Public demo keys: the same head and payloads on every run, so that numbers reproduce to
    the digit, and a warning at every stage (anyone can rebuild the payloads). Never for real
    data. Keys already fixed are kept."""
    if c.consortium_seed < 0:
        c.consortium_seed = 2026
    if c.site.secret_seed < 0:
        c.site.secret_seed = 1000
    return c


# The variants every config accepts, in the order they are listed.
COMMON: dict[str, Variant] = {"runlocal": _runlocal, "tiny": _tiny}


def variant_names(own: Mapping[str, Variant] | None = None) -> tuple[str, ...]:
    """The variants a config with its own variants `own` accepts: the common ones, then its
    own that are not common. Each config module exposes this as its `VARIANTS`."""
    return tuple(dict.fromkeys([*COMMON, *(own or {})]))


def apply_variants(c: ml_collections.ConfigDict, arg: str | None,
                   own: Mapping[str, Variant] | None = None, *,
                   config: str = __file__) -> ml_collections.ConfigDict:
    """Applies the comma-separated variants in `arg` to `c`, in the order given.

    `own` maps the config's own variant names to functions `fn(c) -> c` (they may change `c`
    in place; they return it). A name that is both common and own runs the common change
    first, then the config's own, so a config can refine `runlocal` or `tiny`. `config` is
    the config file (its `__file__`), named in the error an unknown variant raises.
    """
    own = dict(own or {})
    known = variant_names(own)
    for name in (v.strip() for v in (arg or "").split(",")):
        if not name:
            continue
        if name not in known:
            path = Path(config)
            where = f"{path.parent.name}/{path.stem}.py"
            raise SMSDError(f"unknown config variant {name!r} of {where}; it accepts "
                            f"{', '.join(known)} (comma-separated, e.g. {where}:{known[0]})")
        for table in (COMMON, own):
            if name in table:
                result = table[name](c)
                if not isinstance(result, ml_collections.ConfigDict):
                    raise TypeError(f"config variant {name!r} of {config}: "
                                    f"{table[name].__qualname__} must return the config")
                c = result
    return c


VARIANTS = variant_names()
