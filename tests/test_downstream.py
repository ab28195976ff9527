"""Stage 3: label subsets, AUC, k-NN, linear probe, feature extraction, fine-tuning, protocol."""

import json

import jax
import numpy as np
import pytest

from configs import base
from smsd_jax import consortium, data, downstream, evaluation, models, validate
from smsd_jax.downstream import per_site
from smsd_jax.data import fashion_mnist

MEAN, STD = 0.286, 0.353


@pytest.fixture(scope="module")
def train():
    return fashion_mnist("train")


@pytest.fixture(scope="module")
def test():
    return fashion_mnist("test")


@pytest.fixture(scope="module")
def classifier():
    """A tiny untrained `ViTClassifier` and its parameters (initialised once: init is slow)."""
    model = models.ViTClassifier(models.ViTHead(28, 4, 32), models.ViTBody(32, 2, 2), 10,
                                 mean=MEAN, std=STD)
    return model, model.init(jax.random.key(0), np.zeros((1, 28, 28, 1)))["params"]


# ---------------------------------------------------------------- label_subset


def test_label_subset_is_stratified_nested_and_deterministic(train):
    labels = train.labels[:5000]
    small = downstream.label_subset(labels, 0.01, seed=3)
    large = downstream.label_subset(labels, 0.1, seed=3)
    for subset, fraction in ((small, 0.01), (large, 0.1)):
        assert np.all(np.diff(subset) > 0)  # sorted, no repeats
        expected = np.maximum(1, np.round(fraction * np.bincount(labels, minlength=10)))
        np.testing.assert_array_equal(np.bincount(labels[subset], minlength=10), expected)
    assert set(small) <= set(large)
    np.testing.assert_array_equal(small, downstream.label_subset(labels, 0.01, seed=3))
    assert not np.array_equal(small, downstream.label_subset(labels, 0.01, seed=4))


def test_label_subset_keeps_one_of_each_rare_class():
    labels = np.array([0] * 500 + [1] * 3 + [4] * 1)
    subset = downstream.label_subset(labels, 0.01, seed=0)
    assert sorted(np.bincount(labels[subset]).tolist()) == [0, 0, 1, 1, 5]


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan")])
def test_label_subset_refuses_bad_fractions(fraction):
    with pytest.raises(ValueError, match="fraction"):
        downstream.label_subset(np.arange(10) % 2, fraction, seed=0)


# ---------------------------------------------------------------- validation split


def test_validation_split_is_stratified_disjoint_and_deterministic(train):
    labels = train.labels[downstream.label_subset(train.labels[:5000], 0.1, seed=0)]  # 500
    tr, val = downstream.validation_split(labels, 0.1, seed=3)
    assert tr.dtype == val.dtype == np.int64
    assert np.all(np.diff(tr) > 0) and np.all(np.diff(val) > 0)
    assert not set(tr) & set(val)
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, val])), np.arange(len(labels)))
    counts = np.bincount(labels, minlength=10)
    np.testing.assert_array_equal(np.bincount(labels[val], minlength=10),
                                  np.maximum(1, np.round(0.1 * counts)))
    again = downstream.validation_split(labels, 0.1, seed=3)
    np.testing.assert_array_equal(tr, again[0])
    np.testing.assert_array_equal(val, again[1])
    assert not np.array_equal(val, downstream.validation_split(labels, 0.1, seed=4)[1])
    tr, val = downstream.validation_split(labels, 0.0, seed=3)
    assert val.size == 0 and tr.size == len(labels)


def test_each_site_holds_out_a_share_of_its_own_classes(train):
    config = base.get_config()
    parts = data.split_sites(train.labels, config.data, seed=0)  # Dirichlet: non-IID sites
    held_outs = []
    for k, part in enumerate(parts):
        pool, held = per_site.site_split(train.labels, part, 0.2, seed=0, site=k)
        assert np.array_equal(np.sort(np.concatenate([pool, held])), np.sort(part))
        assert not set(pool) & set(held)
        mine, kept = (np.bincount(train.labels[x], minlength=10) for x in (part, held))
        assert np.all(np.abs(kept - 0.2 * mine) <= 1)  # stratified by the site's own mix
        held_outs.append(held)
    # Another site, another draw; the same site, the same draw.
    _, again = per_site.site_split(train.labels, parts[0], 0.2, seed=0, site=0)
    assert np.array_equal(again, held_outs[0])
    with pytest.raises(ValueError, match="site_test_fraction=1.0"):
        per_site.site_split(train.labels, parts[0], 1.0, seed=0, site=0)


def test_validation_split_takes_one_of_each_class_that_has_two():
    labels = np.array([0] * 40 + [1] * 2 + [2] * 1 + [3] * 3)
    tr, val = downstream.validation_split(labels, 0.1, seed=0)
    assert np.bincount(labels[val], minlength=4).tolist() == [4, 1, 0, 1]
    assert np.bincount(labels[tr], minlength=4).tolist() == [36, 1, 1, 2]


@pytest.mark.parametrize("fraction", [-0.1, 1.0, float("nan")])
def test_validation_split_refuses_bad_fractions(fraction):
    with pytest.raises(ValueError, match="fraction"):
        downstream.validation_split(np.arange(10) % 2, fraction, seed=0)


# ---------------------------------------------------------------- best epoch, early stopping


def _scripted(curve):
    """`run_epoch`, `validate` and the epochs run: epoch e's parameters are `{"epoch": e}`,
    its validation `curve[e - 1]` (an accuracy, or (accuracy, loss))."""
    ran = []

    def run_epoch(epoch):
        ran.append(epoch)
        return {"epoch": epoch}

    def validate(params):
        value = curve[params["epoch"] - 1]
        return value if isinstance(value, tuple) else (value, 1.0)

    return run_epoch, validate, ran


def test_best_epoch_keeps_the_parameters_of_the_best_validation_accuracy():
    curve = [0.2, 0.6, (0.5, 0.1), (0.6, 0.9), (0.6, 0.5), 0.55, 0.3]
    run_epoch, validate, ran = _scripted(curve)
    params, info = downstream.best_epoch(run_epoch, validate, epochs=7)
    # Epochs 2, 4, 5 tie at 0.6; epoch 5 has the lowest loss among them (0.5 < 0.9 < 1.0).
    assert params == {"epoch": 5} and info["best_epoch"] == 5
    assert ran == list(range(1, 8)) and info["epochs_run"] == 7
    assert info["val_accuracy"] == [c[0] if isinstance(c, tuple) else c for c in curve]
    # An exact tie (accuracy and loss) goes to the earlier epoch.
    params, info = downstream.best_epoch(*_scripted([0.3, 0.7, 0.7, 0.1])[:2], epochs=4)
    assert params == {"epoch": 2} and info["best_epoch"] == 2
    # Without validation: the last epoch.
    params, info = downstream.best_epoch(run_epoch, None, epochs=3)
    assert params == {"epoch": 3} and info["val_accuracy"] == []


def test_early_stopping_stops_after_patience_epochs_without_improvement():
    curve = [0.1, 0.5, 0.4, 0.5, 0.3, 0.9, 0.2]
    run_epoch, validate, ran = _scripted(curve)
    params, info = downstream.best_epoch(run_epoch, validate, epochs=7, patience=3)
    assert ran == [1, 2, 3, 4, 5]  # epochs 3, 4, 5 are no better than epoch 2: stop
    assert params == {"epoch": 2} and info["epochs_run"] == 5
    assert info["val_accuracy"] == curve[:5]
    run_epoch, validate, ran = _scripted(curve)
    params, info = downstream.best_epoch(run_epoch, validate, epochs=7, patience=0)
    assert ran == list(range(1, 8)) and params == {"epoch": 6}
    run_epoch, validate, ran = _scripted(curve)
    params, _ = downstream.best_epoch(run_epoch, validate, epochs=7, patience=4)
    assert ran == list(range(1, 8)) and params == {"epoch": 6}  # 3, 4, 5: patience left


# ---------------------------------------------------------------- macro_auc


def _pairwise_auc(scores, labels):
    """The definition: over positive/negative pairs, 1 if the positive scores higher, 1/2 tie."""
    aucs = []
    for c in np.unique(labels):
        pos, neg = scores[labels == c, c], scores[labels != c, c]
        diff = pos[:, None] - neg[None, :]
        aucs.append(np.mean((diff > 0) + 0.5 * (diff == 0)))
    return np.mean(aucs)


def test_macro_auc_equals_pairwise_count_with_ties():
    # Random inputs on purpose: few distinct scores give many ties; class 2 is absent.
    rng = np.random.default_rng(0)
    labels = rng.choice([0, 1, 3], size=300)
    scores = rng.integers(0, 5, size=(300, 4)).astype(np.float32)
    auc = evaluation.macro_auc(scores, labels)
    assert auc == pytest.approx(_pairwise_auc(scores, labels), abs=1e-12)


def test_macro_auc_is_one_for_perfect_and_half_for_random_scores():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, size=5000)
    assert evaluation.macro_auc(np.eye(10)[labels], labels) == 1.0
    assert evaluation.macro_auc(rng.random((5000, 10)), labels) == pytest.approx(0.5, abs=0.03)


def test_accuracy_and_evaluate_scores():
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    assert evaluation.accuracy(scores, [0, 1, 1]) == pytest.approx(2 / 3)
    metrics = evaluation.evaluate_scores(scores, np.array([0, 1, 1]))
    assert set(metrics) == {"accuracy", "auc"} and metrics["auc"] == pytest.approx(1.0)


# ---------------------------------------------------------------- k-NN and linear probe


@pytest.fixture(scope="module")
def pixels(train, test):
    """Raw pixels of 2000 train and 500 test images, with labels."""
    return (downstream.raw_pixel_features(train, np.arange(2000)), train.labels[:2000],
            downstream.raw_pixel_features(test, np.arange(500)), test.labels[:500])


def test_raw_pixel_features_are_the_flattened_images(train, pixels):
    x_train = pixels[0]
    assert x_train.shape == (2000, 784) and x_train.dtype == np.float32
    np.testing.assert_allclose(x_train[1234], train.images[1234].ravel() / 255.0, atol=1e-7)


def test_knn_on_real_pixels_beats_chance_and_chunks_do_not_matter(pixels):
    x_train, y_train, x_test, y_test = pixels
    whole = downstream.knn_classify(x_train[:1000], y_train[:1000], x_test, num_classes=10,
                                    chunk_size=len(x_test))
    chunked = downstream.knn_classify(x_train[:1000], y_train[:1000], x_test, num_classes=10,
                                      chunk_size=37)
    np.testing.assert_allclose(chunked, whole, atol=1e-5)
    np.testing.assert_allclose(whole.sum(-1), 1.0, rtol=1e-5)
    assert evaluation.accuracy(whole, y_test) > 0.6


def test_knn_with_one_neighbour_is_the_nearest_by_cosine():
    # Random inputs on purpose: scaling a feature vector must not change its neighbours.
    rng = np.random.default_rng(0)
    x_train = rng.normal(size=(50, 8)) * rng.uniform(0.1, 10, size=(50, 1))
    y_train, x_test = rng.integers(0, 4, size=50), rng.normal(size=(20, 8))
    cosine = (x_test / np.linalg.norm(x_test, axis=1, keepdims=True)) @ (
        x_train / np.linalg.norm(x_train, axis=1, keepdims=True)).T
    scores = downstream.knn_classify(x_train, y_train, x_test, num_classes=4, k=1)
    np.testing.assert_allclose(scores, np.eye(4)[y_train[cosine.argmax(1)]], atol=1e-6)


def test_knn_neighbours_is_at_most_a_tenth_of_the_labelled_set():
    assert downstream.knn_neighbours(20, 10_000) == 20
    assert downstream.knn_neighbours(20, 200) == 20
    assert downstream.knn_neighbours(20, 199) == 19
    assert downstream.knn_neighbours(20, 40) == 4
    assert downstream.knn_neighbours(20, 9) == 1
    assert downstream.knn_neighbours(1, 5000) == 1


@pytest.mark.slow
def test_protocol_caps_k_at_a_tenth_of_the_labelled_images(train, test):
    config = base.get_config("tiny")  # 256 candidates, 256 test images
    config.downstream.update(knn_k=50, label_fractions=(0.05, 0.5))
    result = downstream.evaluate_pixels(config, train, test)
    idx = downstream.label_subset(train.labels[:256], 0.5, seed=config.seed)
    labelled = result["labelled"]
    assert labelled["0.5"] == len(idx) and 120 <= len(idx) < 130 and labelled["0.05"] < 20
    assert result["knn"]["0.5"]["k"] == 12 and result["knn"]["0.05"]["k"] == 1
    test_idx = downstream.held_out_indices(config, test)
    scores = downstream.knn_classify(
        downstream.raw_pixel_features(train, idx), train.labels[idx],
        downstream.raw_pixel_features(test, test_idx), num_classes=10, k=12)
    assert result["knn"]["0.5"]["accuracy"] == evaluation.accuracy(scores, test.labels[test_idx])


@pytest.mark.slow
def test_linear_probe_on_real_pixels_beats_chance_and_is_deterministic(pixels):
    x_train, y_train, x_test, y_test = pixels
    probe = lambda seed: downstream.linear_probe(x_train, y_train, x_test, num_classes=10,
                                                 steps=300, lr=1e-2, seed=seed)
    scores = probe(0)
    assert scores.shape == (500, 10)
    assert evaluation.accuracy(scores, y_test) > 0.65
    assert evaluation.macro_auc(scores, y_test) > 0.9
    np.testing.assert_array_equal(scores, probe(0))
    assert not np.array_equal(scores, probe(1))


# ---------------------------------------------------------------- model stages


def test_extract_features_keeps_order_and_pads_the_last_batch(classifier, test):
    model, params = classifier
    indices = np.array([9, 2, 31, 0, 17, 5, 44, 3, 12, 8, 21, 1, 30])  # 13 = 2 x 5 + 3
    feats = downstream.extract_features(model, params, test, indices, batch_size=5)
    assert set(feats) == {"knn", "linear"}
    np.testing.assert_array_equal(feats["linear"], feats["knn"])  # the fixture's: "cls"
    feats = feats["knn"]
    assert feats.shape == (13, 32) and feats.dtype == np.float32
    one_by_one = jax.jit(lambda image: model.apply({"params": params}, image,
                                                   method=model.features))
    for row, i in enumerate(indices):
        image = test.images[i:i + 1].astype(np.float32) / 255.0  # the model normalises
        np.testing.assert_allclose(feats[row], one_by_one(image)[0], atol=1e-5)
    # The model's normalisation is the sites': the head sees (x - mean) / std.
    image = test.images[:1].astype(np.float32) / 255.0
    plain = models.ViTClassifier(model.head, model.body, 10)
    np.testing.assert_allclose(
        plain.apply({"params": params}, (image - MEAN) / STD, method=plain.features),
        model.apply({"params": params}, image, method=model.features), atol=1e-5)


@pytest.mark.slow
def test_finetune_improves_on_the_untrained_model(classifier, train, test):
    model, params = classifier
    test_idx = np.arange(500)
    before = downstream.evaluate_model(model, params, test, test_idx, batch_size=100)
    tuned, _ = downstream.fit(model, params, train, np.arange(512), epochs=6, lr=3e-3,
                              batch_size=32, seed=0, eval_batch_size=100)
    after = downstream.evaluate_model(model, tuned, test, test_idx, batch_size=100)
    assert after["accuracy"] > before["accuracy"] + 0.2
    assert after["auc"] > 0.8


@pytest.mark.slow
def test_finetune_on_fewer_images_than_a_batch(classifier, train, test):
    model, params = classifier
    tuned, info = downstream.fit(model, params, train, np.arange(20), epochs=1, lr=1e-3,
                                 batch_size=64, seed=0, augment=dict(flip=True, max_shift=2))
    assert info["steps"] == 1 and info["steps_per_epoch"] == 1  # one batch of all 20
    metrics = downstream.evaluate_model(model, tuned, test, np.arange(100), batch_size=64)
    assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["auc"] <= 1


@pytest.mark.slow
def test_fit_returns_the_parameters_of_its_best_validation_epoch(classifier, train):
    model, params = classifier
    train_idx, val_idx = np.arange(256), np.arange(256, 336)
    best, info = downstream.fit(model, params, train, train_idx, epochs=5, lr=3e-3,
                                batch_size=64, seed=0, val_idx=val_idx,
                                eval_batch_size=50)
    assert info["epochs_run"] == 5 and len(info["val_accuracy"]) == 5
    assert info["steps"] == 20 and info["steps_per_epoch"] == 4
    assert (info["train_images"], info["val_images"]) == (256, 80)
    key = [(a, -l) for a, l in zip(info["val_accuracy"], info["val_loss"])]
    assert info["best_epoch"] == 1 + max(range(5), key=lambda e: (key[e], -e))
    again = downstream.evaluate_model(model, best, train, val_idx, batch_size=80)
    assert again["accuracy"] == pytest.approx(max(info["val_accuracy"]), abs=1 / 80 + 1e-9)


@pytest.mark.slow
def test_finetune_reports_its_epoch_and_curve_and_obeys_the_step_cap(classifier, train):
    model, params = classifier
    _, metrics = downstream.fit(model, params, train, np.arange(64), epochs=10, lr=1e-3,
                                batch_size=32, seed=0, val_idx=np.arange(64, 84), max_steps=3)
    assert metrics["steps"] == 3 and metrics["epochs_run"] == 2  # 2 steps an epoch
    assert len(metrics["val_accuracy"]) == 2 and metrics["best_epoch"] in (1, 2)
    json.dumps(metrics)


@pytest.mark.slow
def test_a_small_labelled_set_trains_at_least_min_steps_with_patience_scaled(classifier, train):
    model, params = classifier
    # 40 images at batch 64: 1 step an epoch; 3 epochs with patience 1 would be 3 steps.
    _, info = downstream.fit(model, params, train, np.arange(40), epochs=3, lr=1e-3,
                             batch_size=64, seed=0, patience=1,
                             val_idx=np.arange(40, 60), min_steps=12)
    assert info["steps_per_epoch"] == 1 and info["epochs_planned"] == 12
    assert info["patience"] == 4  # 1 epoch of 3 is a third of the run; a third of 12 is 4
    assert info["steps"] == info["epochs_run"] >= min(12, info["best_epoch"] + 4)
    _, large = downstream.fit(model, params, train, np.arange(256), epochs=3, lr=1e-3,
                              batch_size=64, seed=0, min_steps=12)
    assert (large["epochs_planned"], large["steps"]) == (3, 12)  # already 12: unchanged


# ---------------------------------------------------------------- protocol and table


@pytest.fixture(scope="module")
def tiny_head(tmp_path_factory):
    config = base.get_config("tiny")
    head_dir = tmp_path_factory.mktemp("consortium") / "head"
    consortium.init_head(config, head_dir, secret_seed=0)
    return config, head_dir


@pytest.mark.slow
def test_evaluate_body_with_a_random_body(tiny_head, train, test, capsys):
    config, head_dir = tiny_head
    body = models.body_from_config(config)
    result = downstream.evaluate_body(config, head_dir, body, None, train_source=train,
                                      test_source=test, name="random body")
    assert result["name"] == "random body"
    assert set(result) == {"name", "linear", "knn", "finetune", "labelled"}
    assert set(result["linear"]) == set(result["knn"]) == {"0.5"}
    assert set(result["finetune"]) == {"0.5"}
    per_class = np.bincount(train.labels[:config.data.subset])  # subset: the candidates
    assert result["labelled"] == {"0.5": int(np.maximum(1, np.round(0.5 * per_class)).sum())}
    for method in ("linear", "knn", "finetune"):
        metrics = result[method]["0.5"]
        assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["auc"] <= 1
    assert result["linear"]["0.5"]["accuracy"] > 0.2  # above chance even untrained
    tuned = result["finetune"]["0.5"]
    assert tuned["train_images"] + tuned["val_images"] == result["labelled"]["0.5"]
    assert tuned["val_images"] >= 10  # at least one image of each class
    assert len(tuned["val_accuracy"]) == tuned["epochs_run"] == config.downstream.finetune_epochs
    assert result["knn"]["0.5"]["k"] == downstream.knn_neighbours(config.downstream.knn_k,
                                                                  result["labelled"]["0.5"])
    json.dumps(result)
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[random body]")]
    assert len(lines) == 4  # features, linear, k-NN, fine-tune


def test_evaluate_body_rejects_a_body_of_another_width(tiny_head, train, test):
    config, head_dir = tiny_head
    with pytest.raises(ValueError, match="width"):
        downstream.evaluate_body(config, head_dir, models.ViTBody(64, 1, 2), None,
                                 train_source=train, test_source=test, name="wrong")


def test_results_table_lists_every_row_and_accuracy(tiny_head, train, test):
    config, _ = tiny_head
    pixels = downstream.evaluate_pixels(config, train, test)
    assert set(pixels) == {"name", "linear", "knn", "labelled"}
    body = {"name": "SMSD body",
            "linear": {"0.5": {"accuracy": 0.8721, "auc": 0.99}},
            "knn": {"0.5": {"accuracy": 0.844, "auc": 0.98}},
            "finetune": {"0.5": {"accuracy": 0.9, "auc": 0.99}}}
    table = downstream.results_table([pixels, body], fractions=(0.5,))
    lines = table.splitlines()
    assert lines[0] == "| features / method | linear 50% | k-NN 50% | fine-tune 50% |"
    assert lines[3] == "| SMSD body | 87.2 | 84.4 | 90.0 |"
    pixel_acc = 100 * pixels["linear"]["0.5"]["accuracy"]
    assert lines[2].startswith(f"| raw pixels | {pixel_acc:.1f} |")
    assert lines[2].endswith("| - |")  # raw pixels are not fine-tuned


def test_labelled_candidates_follow_subset_and_site(train):
    config = base.get_config("tiny")  # subset 256
    np.testing.assert_array_equal(downstream.labelled_candidates(config, train), np.arange(256))
    config.downstream.site = 1
    site = downstream.labelled_candidates(config, train)
    assert 0 < len(site) < 256 and np.all(np.diff(site) > 0) and site.max() < 256
    config.downstream.site = config.data.num_sites
    with pytest.raises(ValueError, match="num_sites"):
        downstream.labelled_candidates(config, train)


@pytest.mark.parametrize("key, value", [("finetune_val_fraction", 1.0),
                                        ("finetune_val_fraction", -0.1),
                                        ("finetune_patience", -1), ("finetune_epochs", 0),
                                        ("finetune_max_steps", -1), ("knn_k", 0)])
def test_check_config_rejects_bad_finetune_and_knn_settings(key, value):
    config = base.get_config("tiny")
    validate.check_config(config)
    config.downstream[key] = value
    with pytest.raises(ValueError, match=f"downstream.{key}"):
        validate.check_config(config)
