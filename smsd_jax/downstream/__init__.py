"""Stage 3, at a site, after: what a site does with the body it gets back.

The site joins its own head, the body and a fresh classification tail into a `ViTClassifier`
and measures the body on its labelled data in a low-label regime: a linear probe and DINO's
weighted k-NN on frozen class features, and a full fine-tune (docs/method.md, "What must be
measured"). Raw pixels and a randomly initialised body are the baselines on the same subsets.

Single-label data (one class per image) is scored by accuracy and macro AUC; multi-label data
(F binary findings per image, some unknown: `data.MultiLabelSource`) by a sigmoid per finding,
binary cross-entropy over the known labels only, and mean AUC over findings. The same k-NN,
linear probe and fit loop serve both; the labels' shape chooses the loss.

    probes.py     pure: label subsets, targets, the linear probe and k-NN of frozen features
    features.py   a model's features and predictions over a data source, read through grain
    finetune.py   fine-tuning head + body + tail with early stopping on a validation split
    protocol.py   the protocol: what may be labelled, each body's probes and fine-tunes
    stage.py      the stage (`--mode=downstream`): each task's results, table and JSON
"""

from smsd_jax.downstream.features import (evaluate_model, extract_features,
                                          raw_pixel_features)
from smsd_jax.downstream.finetune import best_epoch, deployable, fit
from smsd_jax.downstream.probes import (Targets, knn_classify, knn_neighbours, label_subset,
                                        linear_probe, masked_binary_cross_entropy,
                                        probabilities, task_loss, validation_split)
from smsd_jax.downstream.protocol import (evaluate_body, evaluate_pixels, evaluate_pretrained,
                                          held_out_indices, labelled_candidates)
from smsd_jax.downstream.stage import (at_site, downstream_stage, evaluate_task,
                                       results_table)

__all__ = ["Targets", "at_site", "best_epoch", "deployable", "downstream_stage", "evaluate_body",
           "evaluate_model", "evaluate_pixels", "evaluate_pretrained", "evaluate_task",
           "extract_features", "fit", "held_out_indices", "knn_classify", "knn_neighbours",
           "label_subset", "labelled_candidates", "linear_probe",
           "masked_binary_cross_entropy", "probabilities", "raw_pixel_features",
           "results_table", "task_loss", "validation_split"]
