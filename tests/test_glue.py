"""GLUE readers on the official-layout fixtures in data/fixtures/glue, and the metrics against scipy / scikit-learn."""
import os

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from ltp import glue

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "data", "fixtures", "glue")


@pytest.mark.parametrize("task, split, n, first", [
    ("sst2", "train", 3, ("a gorgeous , witty film ", None, 1)),
    ("mrpc", "train", 2, ("Amrozi accused his brother , whom he called \" the witness \" , of lying .",
                          "Referring to him as only \" the witness \" , Amrozi accused his brother of lying .", 1)),
    ("stsb", "dev", 2, ("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", 5.0)),
    ("qnli", "train", 2, ("What came into force after the new constitution was herald?",
                          "As of that day, the new constitution heralding the Second Republic came into force.", 0)),
    ("mnli", "train", 2, ("Conceptually cream skimming has two basic dimensions - product and geography.",
                          "Product and geography are what make cream skimming work. ", 2)),
    ("mnli", "dev", 1, ("The new rights are nice enough", "Everyone really likes the newest benefits ", 2)),
    ("mnli", "dev_mismatched", 2, ("Your contribution helped make it possible for us to provide our students with "
                                   "a quality education.", "Your contributions were of no help with our students' "
                                   "education.", 0)),
    ("qqp", "train", 3, ("How is the life of a math student? Could you describe your own experiences?",
                         "Which level of prepration is enough for the exam jlpt5?", 0)),
    ("rte", "train", 2, ("No Weapons of Mass Destruction Found in Iraq Yet.",
                         "Weapons of Mass Destruction Found in Iraq.", 1)),
    ("cola", "train", 2, ("Our friends won't buy this analysis, let alone the next one we propose.", None, 1)),
    ("wnli", "dev", 1, ("The drain is clogged with hair. It has to be cleaned.", "The hair has to be cleaned.", 0)),
])
def test_every_task_reader_on_its_official_layout(task, split, n, first, capsys):
    rows = glue.read_split(task, FIXTURES, split)
    assert len(rows) == n
    assert (rows[0].text_a, rows[0].text_b, rows[0].label) == first
    assert rows[0].line == (1 if task == "cola" else 2)  # CoLA has no header row
    if task == "qqp":  # the known malformed row (a missing column) is skipped and counted, not read
        assert "skipped 1 malformed rows" in capsys.readouterr().err
        assert [r.line for r in rows] == [2, 3, 5]


def test_reader_errors_name_the_file_and_line(tmp_path):
    d = tmp_path / "SST-2"
    d.mkdir()
    (d / "train.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t7\n")
    with pytest.raises(ValueError, match=r"train\.tsv:3: malformed row: label '7'"):
        glue.read_split("sst2", str(tmp_path), "train")
    (d / "train.tsv").write_text("sentence\tlabel\n")
    with pytest.raises(ValueError, match=r"train\.tsv: no data rows"):
        glue.read_split("sst2", str(tmp_path), "train")


def random_cases():
    rng = np.random.default_rng(0)
    for n in (5, 40, 300):
        yield rng.integers(0, 2, n), rng.integers(0, 2, n)
    yield np.ones(10, int), rng.integers(0, 2, 10)            # constant predictions
    yield rng.integers(0, 2, 10), np.zeros(10, int)           # no positive class in the labels
    yield np.zeros(10, int), np.zeros(10, int)                # nothing positive anywhere


@pytest.mark.filterwarnings("ignore:A single label")
@pytest.mark.parametrize("preds, labels", list(random_cases()))
def test_classification_metrics_match_scikit_learn(preds, labels):
    assert glue.accuracy(preds, labels) == pytest.approx(skm.accuracy_score(labels, preds))
    assert glue.f1(preds, labels) == pytest.approx(skm.f1_score(labels, preds, zero_division=0.0))
    assert glue.mcc(preds, labels) == pytest.approx(skm.matthews_corrcoef(labels, preds), abs=1e-12)


def test_correlations_match_scipy_with_ties():
    rng = np.random.default_rng(1)
    for n in (3, 50, 500):
        x = rng.normal(size=n)
        y = x + rng.normal(size=n)
        assert glue.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
        # STS-B's gold scores come in steps of 0.2: many ties
        xt, yt = np.round(x * 5) / 5, np.round(y * 5) / 5
        assert glue.spearman(xt, yt) == pytest.approx(stats.spearmanr(xt, yt)[0])
        np.testing.assert_allclose(glue.rankdata(yt), stats.rankdata(yt))
    assert glue.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) == 0.0  # constant input: defined as 0, not NaN


def test_a_failed_download_leaves_no_folders(tmp_path, monkeypatch):
    def offline(url, dest):
        raise OSError("no network")
    monkeypatch.setattr(glue, "fetch", offline)
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError, match="could not download GLUE sst2 .*no network"):
        glue.download("sst2", str(tmp_path / "kept" / "typo" / "glue"))
    assert os.listdir(tmp_path / "kept") == []  # typo/glue/SST-2 created for the download, removed again


def test_score_reports_relative_bops():
    """score's relative_bops: relative FLOPs for a float model (the default), the int8 count with linear_bits=8."""
    from types import SimpleNamespace
    import torch
    cfg = SimpleNamespace(num_hidden_layers=1, hidden_size=1, intermediate_size=4)
    logits, labels = torch.tensor([[0.0, 1.0], [1.0, 0.0]]), [1, 1]
    kept = torch.tensor([[1, 1], [2, 1]])  # FLOPs (linear, attention): (24, 4) and (30, 12); unpruned 28 and 64
    row = glue.score("sst2", logits, kept, labels, cfg)
    assert row["accuracy"] == 0.5 and row["relative_flops"] == round(70 / 92, 6) == row["relative_bops"]
    row8 = glue.score("sst2", logits, kept, labels, cfg, linear_bits=8)
    assert row8["relative_bops"] == round((54 / 4 + 16) / 92, 6) and row8["relative_flops"] == row["relative_flops"]
