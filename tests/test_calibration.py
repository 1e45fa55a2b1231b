"""Calibrated probabilities, the expected calibration error and the novelty score behind ``"unknown"``."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scanpy as sc

import scbert_tl as scbert
from scbert_tl import ScBERT
from scbert_tl.train import _calibration as cal

SMALL = {"dim": 32, "depth": 1, "heads": 2, "dim_head": 16, "classifier_hidden": (256, 64), "classifier_dropout": 0.1}


def _sampled(rng, n, n_classes, temperature):
    """Logits and labels drawn from softmax(logits / temperature): the logits are overconfident by that factor."""
    logits = rng.normal(0, 3, size=(n, n_classes))
    p = cal.softmax(logits, temperature)
    labels = np.array([rng.choice(n_classes, p=row) for row in p])
    return logits, labels


def test_temperature_recovers_a_known_overconfidence_and_lowers_held_out_nll():
    rng = np.random.default_rng(0)
    fit_logits, fit_labels = _sampled(rng, 2000, 5, 2.5)
    test_logits, test_labels = _sampled(rng, 2000, 5, 2.5)
    t = cal.fit_temperature(fit_logits, fit_labels)
    assert t == pytest.approx(2.5, rel=0.1)
    assert cal.nll(test_logits, test_labels, t) < cal.nll(test_logits, test_labels) - 0.1
    correct = test_logits.argmax(1) == test_labels
    before = cal.expected_calibration_error(cal.softmax(test_logits).max(1), correct)
    after = cal.expected_calibration_error(cal.softmax(test_logits, t).max(1), correct)
    assert after < 0.03 < before


def test_temperature_stays_near_one_when_every_validation_cell_is_right():
    """Without a single error the likelihood alone would send T to its lower bound (ever more confident)."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 300)
    logits = rng.normal(0, 1, (300, 4))
    logits[np.arange(300), labels] += 8  # every cell right, by a wide margin
    assert cal.nll(logits, labels, 0.05) < cal.nll(logits, labels, 1.0)  # what an unpenalised fit would chase
    assert 0.5 < cal.fit_temperature(logits, labels) <= 1.0


def test_expected_calibration_error_by_hand():
    conf = np.array([0.95] * 10 + [0.55] * 10)
    right = np.array([True] * 10 + [True] * 5 + [False] * 5)
    # bin (0.933, 1]: accuracy 1 vs 0.95; bin (0.533, 0.6]: accuracy 0.5 vs 0.55; half of the cells each
    assert cal.expected_calibration_error(conf, right) == pytest.approx(0.5 * 0.05 + 0.5 * 0.05)
    assert cal.expected_calibration_error(np.full(8, 0.75), np.array([1, 1, 1, 0] * 2, dtype=bool)) == pytest.approx(0)
    assert np.isnan(cal.expected_calibration_error(np.array([]), np.array([], dtype=bool)))


def test_calibration_noise_is_what_a_calibrated_method_shows_on_few_cells():
    assert cal.calibration_noise(np.ones(50)) == 0  # always right at confidence 1: no noise
    half = cal.calibration_noise(np.full(100, 0.5))
    # one bin of 100 cells right with probability 0.5: E|mean - 0.5| = 0.04 (normal approximation)
    assert half == pytest.approx(np.sqrt(0.25 / 100) * np.sqrt(2 / np.pi), rel=0.15)
    assert cal.calibration_noise(np.full(10_000, 0.5)) < half / 5  # shrinks with the cells
    rng = np.random.default_rng(1)
    confidence = rng.uniform(0.4, 1.0, 500)
    right = rng.random(500) < confidence  # calibrated by construction
    assert cal.expected_calibration_error(confidence, right) < 3 * cal.calibration_noise(confidence)
    assert cal.expected_calibration_error(confidence, np.ones(500, bool)) > 3 * cal.calibration_noise(confidence)


def test_threshold_for_a_rate_from_stored_quantiles():
    values = np.arange(1000, dtype=float)
    quantiles = np.quantile(values, cal.QUANTILE_LEVELS)
    for rate in (0.0, 0.05, 0.2, 1.0):
        t = cal.threshold_for_rate(quantiles, rate)
        assert (values > t).mean() == pytest.approx(rate, abs=0.002)
    with pytest.raises(ValueError, match="false_unknown_rate"):
        cal.threshold_for_rate(quantiles, 1.5)


def test_energy_is_higher_for_flat_low_logits():
    logits = np.array([[8.0, 0.0, 0.0], [0.5, 0.4, 0.3]])
    scores = cal.novelty_scores(logits, temperature=2.0)
    assert scores["energy"][1] > scores["energy"][0]
    assert scores["probability"][1] > scores["probability"][0]
    # dividing by T > 1 flattens the probabilities: the calibrated top probability is lower
    assert scores["calibrated_probability"][0] > scores["probability"][0]


# ------------------------------------------------------------------------------------------ on real cells
@pytest.fixture(scope="module")
def b_left_out(pbmc3k_path):
    """A small model fine-tuned on 90 cells of each PBMC3k type but B; held-out known cells and all B cells of the sample."""
    adata = ad.read_h5ad(pbmc3k_path)
    rng = np.random.default_rng(0)
    keep = np.concatenate(
        [
            rng.permutation(np.flatnonzero(adata.obs["cell_type"] == c))[:90]
            for c in adata.obs["cell_type"].cat.categories
        ]
    )
    pbmc = adata[np.sort(keep)].copy()
    tmp = pbmc.copy()
    sc.pp.normalize_total(tmp)
    sc.pp.log1p(tmp)
    sc.pp.highly_variable_genes(tmp, n_top_genes=300, flavor="cell_ranger")
    genes = list(tmp.var_names[tmp.var["highly_variable"]])
    test = np.zeros(pbmc.n_obs, dtype=bool)
    test[np.random.default_rng(1).permutation(pbmc.n_obs)[: pbmc.n_obs // 4]] = True
    is_b = (pbmc.obs["cell_type"] == "B").to_numpy()
    ref, query = pbmc[~test & ~is_b].copy(), pbmc[test | is_b].copy()
    # No gene masking: this tiny model (300 genes, one layer, 90 cells a type) is about calibration and
    # novelty, and with masking its ranking of the left-out type swings from seed to seed.
    model = scbert.tl.finetune(
        ref, "cell_type", model=ScBERT.new(genes, seed=0, **SMALL), epochs=12, batch_size=16, mask_genes=0.0
    )
    return model, ref, query


def test_energy_ranks_a_left_out_type_above_the_known_ones(b_left_out):
    from sklearn.metrics import roc_auc_score

    model, _, query = b_left_out
    scbert.tl.annotate(query, model)
    novel = (query.obs["cell_type"] == "B").to_numpy()
    energy = roc_auc_score(novel, query.obs["scbert_novelty"])
    probability = roc_auc_score(novel, -query.obs["scbert_confidence"])
    assert energy >= 0.75 and energy > probability
    unknown = (query.obs["scbert"] == "unknown").to_numpy()
    assert unknown[novel].mean() > 2 * unknown[~novel].mean()  # B cells are called unknown far more often


def test_auto_threshold_meets_the_false_unknown_rate_on_validation_cells(b_left_out):
    model, ref, _ = b_left_out
    val = ref[ref.obs["scbert_split"] == "validation"].copy()
    assert val.n_obs == model.calibration["n_validation"]
    for rate in (0.05, 0.2):
        out = scbert.tl.annotate(val, model, false_unknown_rate=rate, copy=True)
        share = (out.obs["scbert"] == "unknown").mean()
        assert share == pytest.approx(rate, abs=1 / val.n_obs + 0.005)
        params = out.uns["scbert"]["params"]["annotate"]
        assert params["unknown_score"] == "energy" and params["false_unknown_rate"] == rate
        expected = out.obs["scbert_novelty"] > params["unknown_score_threshold"]
        np.testing.assert_array_equal(out.obs["scbert"] == "unknown", expected)


def test_calibration_is_saved_loaded_and_used(b_left_out, tmp_path):
    import copy

    model, _, query = b_left_out
    record = model.calibration
    assert record["temperature"] == pytest.approx(model.provenance["calibration"]["temperature"])
    assert len(record["quantiles"]) == cal.QUANTILE_LEVELS.size and np.all(np.diff(record["quantiles"]) >= 0)
    model.save(tmp_path / "m")
    loaded = ScBERT.load(tmp_path / "m")
    assert loaded.calibration["temperature"] == record["temperature"]
    np.testing.assert_allclose(loaded.calibration["quantiles"], record["quantiles"])
    a = scbert.tl.annotate(query, loaded, copy=True)
    plain = copy.deepcopy(model)
    plain.calibration = {**record, "temperature": 1.0}
    b = scbert.tl.annotate(query, plain, copy=True)
    # the calibrated probabilities are the plain ones with the logits divided by the temperature
    log_p = np.log(b.obsm["scbert_probabilities"].astype(np.float64))
    np.testing.assert_allclose(
        a.obsm["scbert_probabilities"], cal.softmax(log_p, record["temperature"]), rtol=1e-4, atol=1e-6
    )
    assert a.uns["scbert"]["params"]["annotate"]["temperature"] == record["temperature"]


def test_temperature_undoes_an_overconfident_classifier_on_held_out_cells(b_left_out):
    """Scale the last layer by 6 (the same types, far too confident): the refitted temperature undoes it."""
    import copy

    import torch

    from scbert_tl.tl._data import tokens_for
    from scbert_tl.tl._finetune import _labels

    model, ref, query = b_left_out
    sharp = copy.deepcopy(model)
    with torch.no_grad():
        sharp.network.classifier.fc3.weight.mul_(6)
        sharp.network.classifier.fc3.bias.mul_(6)
    labels, classes = _labels(ref, "cell_type")
    assert classes == model.classes
    val_rows = np.flatnonzero((ref.obs["scbert_split"] == "validation").to_numpy())
    sharp.calibration = cal.calibrate(sharp.network, tokens_for(ref, sharp), labels, val_rows)
    assert sharp.calibration["temperature"] > 4 * model.calibration["temperature"]
    known = query[query.obs["cell_type"] != "B"].copy()
    y = np.searchsorted(classes, known.obs["cell_type"].astype(str))
    assert [classes[i] for i in y[:5]] == list(known.obs["cell_type"].astype(str)[:5])
    rows = np.arange(y.size)

    def held_out_nll(m):
        p = scbert.tl.annotate(known, m, copy=True).obsm["scbert_probabilities"]
        return -np.log(p[rows, y].astype(np.float64) + 1e-12).mean()

    calibrated, original = held_out_nll(sharp), held_out_nll(model)
    sharp.calibration = {**sharp.calibration, "temperature": 1.0}
    raw = held_out_nll(sharp)
    assert calibrated < raw - 0.05  # lower on cells neither the training nor the temperature saw
    assert calibrated == pytest.approx(original, abs=0.03)  # as if the logits had never been scaled


def test_annotate_unknown_options_and_models_without_a_record(b_left_out, caplog):
    import copy

    model, _, query = b_left_out
    with pytest.raises(ValueError, match="applies to unknown_threshold='auto' only"):
        scbert.tl.annotate(query, model, unknown_threshold=0.5, false_unknown_rate=0.1, copy=True)
    with pytest.raises(ValueError, match="'auto' or a number"):
        scbert.tl.annotate(query, model, unknown_threshold="sometimes", copy=True)
    with pytest.raises(ValueError, match="false_unknown_rate must be"):
        scbert.tl.annotate(query, model, false_unknown_rate=5, copy=True)
    old = copy.deepcopy(model)
    old.calibration = None  # e.g. an original checkpoint
    with caplog.at_level("WARNING", logger="scbert_tl.tl._annotate"):
        out = scbert.tl.annotate(query, old, copy=True)
    assert "falls back" in caplog.text
    low = (out.obs["scbert_confidence"] < 0.5).to_numpy()
    np.testing.assert_array_equal(out.obs["scbert"] == "unknown", low)
    assert out.uns["scbert"]["params"]["annotate"]["unknown_score"] == "probability"
