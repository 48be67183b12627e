"""The paper's statistics against hand computation and against scipy/statsmodels called directly."""

import itertools
import math

import numpy as np
import polars as pl
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from core.cli import main
from core.errors import UserFacingError
from core.stats import compare_groups, domain_counts, hpo_correlation, in_domain, significance_counts, table4_wide


def score_table(
    groups: dict[str, dict[tuple[str, str], list[float]]], model: str = "classifier-fold-1"
) -> pl.DataFrame:
    """groups[label][(method, region)] = scores, one image per position (image k of a label is the same face
    under every method and region)."""
    rows = []
    for label, cells in groups.items():
        for (method, region), values in cells.items():
            for k, value in enumerate(values):
                rows.append(
                    {
                        "image_name": f"{label}Slide{k}.jpg",
                        "label": label,
                        "fold": "fold-1",
                        "model": model,
                        "method": method,
                        "region": region,
                        "score": value,
                    }
                )
    return pl.DataFrame(rows)


def one_row(table: pl.DataFrame, **where) -> dict:
    rows = table.filter(*[pl.col(k) == v for k, v in where.items()]).rows(named=True)
    assert len(rows) == 1
    return rows[0]


# Five against five, both clearly normal with similar spread: the paper's path is Student's t-test.
SYNDROME = [0.42, 0.47, 0.45, 0.51, 0.49]
REFERENCE = [0.31, 0.36, 0.33, 0.30, 0.35]


def test_five_against_five_t_test_and_cohens_d_by_hand():
    table = compare_groups(
        score_table({"WS": {("Gradient", "mouth"): SYNDROME}, "Unaffected": {("Gradient", "mouth"): REFERENCE}})
    )
    row = one_row(table, method="Gradient", syndrome="WS", region="mouth")
    x, y = np.array(SYNDROME), np.array(REFERENCE)
    # Hand formulas: pooled variance, Student's t with n1 + n2 − 2 degrees of freedom, Cohen's d.
    pooled_var = ((len(x) - 1) * x.var(ddof=1) + (len(y) - 1) * y.var(ddof=1)) / (len(x) + len(y) - 2)
    t = (x.mean() - y.mean()) / math.sqrt(pooled_var * (1 / len(x) + 1 / len(y)))
    p = 2 * stats.t.sf(abs(t), len(x) + len(y) - 2)
    assert row["normal_syndrome"] and row["normal_reference"] and row["equal_variance"]
    assert row["test"] == "t-test"  # equal sizes: pingouin's default (the paper) is Student
    assert row["statistic"] == pytest.approx(t, rel=1e-12)
    assert row["p"] == pytest.approx(p, rel=1e-9)
    assert row["cohens_d"] == pytest.approx((x.mean() - y.mean()) / math.sqrt(pooled_var), rel=1e-12)
    assert row["mean_syndrome"] == pytest.approx(0.468) and row["mean_reference"] == pytest.approx(0.33)
    assert (row["n_syndrome"], row["n_reference"]) == (5, 5)
    # One test in the family: Bonferroni leaves p as it is.
    assert row["p_corrected"] == pytest.approx(row["p"]) and row["significant"] == (row["p"] <= 0.001)
    assert row["note"] is None


def _u_by_hand(x, y) -> float:
    """U of the first sample: pairs with x > y, ties counting one half."""
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in x for b in y)


def _mann_whitney_row(syndrome, reference) -> dict:
    table = compare_groups(
        score_table({"KS": {("Occlusion", "eye"): syndrome}, "Unaffected": {("Occlusion", "eye"): reference}})
    )
    row = one_row(table, syndrome="KS")
    # The syndrome group has an outlier: Shapiro–Wilk rejects normality, so the paper's path is Mann–Whitney.
    assert row["shapiro_p_syndrome"] == pytest.approx(stats.shapiro(syndrome).pvalue)
    assert not row["normal_syndrome"] and row["test"] == "mann-whitney"
    return row


def test_mann_whitney_exact_on_a_tiny_table_by_hand():
    syndrome, reference = [1.0, 1.1, 1.2, 1.3, 9.0], [0.1, 0.2, 0.3, 0.4, 1.15]
    row = _mann_whitney_row(syndrome, reference)
    assert _u_by_hand(syndrome, reference) == 23 == row["statistic"]
    # Small samples without ties get the exact null distribution (scipy's and so pingouin's default):
    # every split of the ten ranks into 5 + 5 is equally likely; two-sided p = 2 P(U >= 23).
    ranks = range(1, 11)
    extreme = sum(sum(chosen) - 15 >= 23 for chosen in itertools.combinations(ranks, 5))
    assert extreme == 4
    assert row["p"] == pytest.approx(2 * extreme / math.comb(10, 5), rel=1e-12)


def test_mann_whitney_with_ties_uses_the_normal_approximation_with_continuity_correction():
    syndrome, reference = [1.0, 1.0, 1.2, 1.3, 9.0], [0.1, 0.2, 0.3, 1.0, 1.15]
    row = _mann_whitney_row(syndrome, reference)
    assert _u_by_hand(syndrome, reference) == 22 == row["statistic"]
    # z = (|U − n1 n2 / 2| − 0.5) / σ, σ² = n1 n2 / 12 · (n + 1 − Σ(t³ − t) / (n (n − 1)));
    # here one tie of three values.
    sigma = math.sqrt(25 / 12 * (11 - (27 - 3) / 90))
    z = (abs(22 - 12.5) - 0.5) / sigma
    assert row["p"] == pytest.approx(2 * stats.norm.sf(z), rel=1e-9)


def test_welch_versus_student_selection():
    # Normal quantiles: as normal as samples get, with similar spread.
    syndrome = list(0.5 + 0.05 * stats.norm.ppf((np.arange(8) + 0.5) / 8))
    reference = list(0.4 + 0.06 * stats.norm.ppf((np.arange(12) + 0.5) / 12))
    scores = score_table({"NS": {("SmoothGrad", "nose"): syndrome}, "Unaffected": {("SmoothGrad", "nose"): reference}})
    tables = {
        variant: one_row(compare_groups(scores, ttest=variant), syndrome="NS")
        for variant in ("paper", "student", "welch")
    }
    assert all(r["normal_syndrome"] and r["normal_reference"] and r["equal_variance"] for r in tables.values())
    welch = stats.ttest_ind(syndrome, reference, equal_var=False)
    student = stats.ttest_ind(syndrome, reference, equal_var=True)
    assert welch.pvalue != pytest.approx(student.pvalue)
    # 8 vs 12: the paper's default (pingouin correction="auto") is Welch because the sizes differ.
    assert tables["paper"]["test"] == "welch" and tables["paper"]["p"] == pytest.approx(welch.pvalue, rel=1e-12)
    assert tables["welch"]["test"] == "welch" and tables["welch"]["p"] == pytest.approx(welch.pvalue, rel=1e-12)
    assert tables["student"]["test"] == "t-test" and tables["student"]["p"] == pytest.approx(student.pvalue, rel=1e-12)
    # Equal sizes: the paper's default is Student; always-Welch stays Welch.
    equal = score_table(
        {"NS": {("SmoothGrad", "nose"): syndrome}, "Unaffected": {("SmoothGrad", "nose"): reference[:8]}}
    )
    assert one_row(compare_groups(equal), syndrome="NS")["test"] == "t-test"
    assert one_row(compare_groups(equal, ttest="welch"), syndrome="NS")["test"] == "welch"


def _random_study(seed: int) -> pl.DataFrame:
    """Two methods, three syndromes, three regions; some groups shifted, some skewed."""
    rng = np.random.default_rng(seed)
    groups: dict[str, dict[tuple[str, str], list[float]]] = {}
    for label, n in (("Unaffected", 30), ("22q11DS", 25), ("Angelman", 30), ("WS", 20)):
        groups[label] = {}
        for method in ("Gradient", "LayerGradCam"):
            for region in ("eye", "nose", "mouth"):
                shift = 0.15 if (label, region) in {("Angelman", "mouth"), ("WS", "mouth"), ("22q11DS", "eye")} else 0
                values = rng.normal(0.4 + shift, 0.05, n) if method == "Gradient" else rng.gamma(2, 0.1, n) + shift
                groups[label][(method, region)] = list(values)
    return score_table(groups)


def _second_implementation(scores: pl.DataFrame, correction: str, alpha: float) -> dict:
    """The paper's procedure written again, straight from scipy and statsmodels."""
    expected = {}
    for method in ("Gradient", "LayerGradCam"):
        keys, pvalues = [], []
        for syndrome in ("22q11DS", "Angelman", "WS"):
            for region in ("eye", "nose", "mouth"):

                def group(label, method=method, region=region):
                    return scores.filter(
                        (pl.col("label") == label) & (pl.col("method") == method) & (pl.col("region") == region)
                    )["score"].to_numpy()

                x, y = group(syndrome), group("Unaffected")
                normal = stats.shapiro(x).pvalue > 0.05 and stats.shapiro(y).pvalue > 0.05
                if normal and stats.levene(x, y).pvalue > 0.05:
                    p = stats.ttest_ind(x, y, equal_var=len(x) == len(y)).pvalue
                else:
                    p = stats.mannwhitneyu(x, y, alternative="two-sided").pvalue
                keys.append((method, syndrome, region))
                pvalues.append(p)
        reject, corrected, _, _ = multipletests(pvalues, alpha=alpha, method=correction)
        for key, p, q, r in zip(keys, pvalues, corrected, reject):
            expected[key] = (p, q, bool(r))
    return expected


@pytest.mark.parametrize("correction", ["bonferroni", "holm", "fdr_bh"])
def test_whole_path_against_a_second_implementation(correction):
    scores = _random_study(seed=7)
    alpha = 0.01
    table = compare_groups(scores, alpha=alpha, correction=correction)
    expected = _second_implementation(scores, correction, alpha)
    assert len(table) == len(expected) == 18
    for row in table.iter_rows(named=True):
        p, q, significant = expected[(row["method"], row["syndrome"], row["region"])]
        assert row["p"] == pytest.approx(p, rel=1e-12)
        assert row["p_corrected"] == pytest.approx(q, rel=1e-12)
        assert row["significant"] == significant
    assert table["test"].n_unique() >= 2  # the study exercises both branches
    assert table["significant"].sum() >= 3  # the planted shifts are found


def test_holm_and_bh_are_less_strict_than_bonferroni():
    scores = _random_study(seed=11)
    bonferroni, holm, bh = (compare_groups(scores, alpha=0.05, correction=c) for c in ("bonferroni", "holm", "fdr_bh"))
    assert (holm["p_corrected"] <= bonferroni["p_corrected"] + 1e-15).all()
    assert (bh["p_corrected"] <= holm["p_corrected"] + 1e-15).all()
    assert bonferroni["significant"].sum() <= holm["significant"].sum() <= bh["significant"].sum()


def test_degenerate_groups_get_a_note_and_stay_out_of_the_correction():
    good_x, good_y = [0.42, 0.47, 0.45, 0.51, 0.49], [0.31, 0.36, 0.33, 0.30, 0.35]
    scores = score_table(
        {
            "Unaffected": {("Gradient", "eye"): good_y, ("Gradient", "nose"): good_y, ("Gradient", "mouth"): good_y},
            "WS": {
                ("Gradient", "eye"): good_x,
                ("Gradient", "nose"): [0.2, 0.2, 0.2, 0.2, 0.2],  # constant
                ("Gradient", "mouth"): [0.5, float("nan"), float("nan"), 0.6, float("nan")],
            },  # 2 finite
            "KS": {
                ("Gradient", "eye"): [float("nan")] * 4,
                ("Gradient", "nose"): good_x,
                ("Gradient", "mouth"): good_x,
            },
        }
    )
    table = compare_groups(scores)
    notes = {(r["syndrome"], r["region"]): r["note"] for r in table.iter_rows(named=True)}
    assert notes[("WS", "nose")] == "constant values in the syndrome group"
    assert notes[("WS", "mouth")] == "n < 3 in the syndrome group (2)"
    assert notes[("KS", "eye")] == "no finite scores in the syndrome group"
    untested = table.filter(pl.col("note").is_not_null())
    assert (
        untested["test"].is_null().all() and untested["p"].is_null().all() and untested["significant"].is_null().all()
    )
    assert one_row(table, syndrome="WS", region="mouth")["n_syndrome"] == 2  # NaN dropped first
    tested = table.filter(pl.col("note").is_null())
    assert len(tested) == 3
    # The family is the three tests that ran: Bonferroni multiplies by 3, not by 6.
    assert np.allclose(tested["p_corrected"].to_numpy(), np.minimum(tested["p"].to_numpy() * 3, 1))


def test_reference_by_name_and_chosen_syndromes():
    scores = _random_study(seed=5)
    table = compare_groups(scores, reference="WS", syndromes=["Angelman"])
    assert set(table["syndrome"]) == {"Angelman"} and len(table) == 6
    row = one_row(table, method="Gradient", region="mouth")
    assert row["n_reference"] == 20 and row["n_syndrome"] == 30
    with pytest.raises(UserFacingError, match="reference group 'Healthy'"):
        compare_groups(scores, reference="Healthy")
    with pytest.raises(UserFacingError, match="'Down'"):
        compare_groups(scores, syndromes=["Down"])
    with pytest.raises(UserFacingError, match="correction"):
        compare_groups(scores, correction="sidak")
    with pytest.raises(UserFacingError, match="lacks column"):
        compare_groups(scores.drop("label"))


def test_an_image_scored_by_several_models_is_refused_unless_one_model_is_chosen():
    one = score_table({"WS": {("Gradient", "mouth"): SYNDROME}, "Unaffected": {("Gradient", "mouth"): REFERENCE}})
    both = pl.concat([one, one.with_columns(model=pl.lit("classifier-fold-2"), score=pl.col("score") + 0.01)])
    with pytest.raises(UserFacingError, match="scored by 2 models"):
        compare_groups(both)
    chosen = one_row(compare_groups(both, model="classifier-fold-2"), syndrome="WS")
    assert chosen["mean_syndrome"] == pytest.approx(np.mean(SYNDROME) + 0.01)
    with pytest.raises(UserFacingError, match="appears 2 times"):
        compare_groups(pl.concat([one, one]))


def test_significance_counts_is_table_3():
    tests = pl.DataFrame(
        {
            "method": ["A", "A", "B", "B", "C", "C"],
            "syndrome": ["WS", "KS"] * 3,
            "region": ["mouth"] * 6,
            "significant": [True, False, True, None, True, True],
        }
    )
    table3 = significance_counts(tests)
    assert table3.columns == ["region", "WS", "KS"]
    assert table3.row(0) == ("mouth", 3, 1)


def test_hpo_correlation_per_model_matches_scipy_and_table_4_summarises():
    rng = np.random.default_rng(2)
    names = [f"WSSlide{k}.jpg" for k in range(12)]
    counts = pl.DataFrame(
        {
            "image_name": names * 2,
            "region": ["mouth"] * 12 + ["eye"] * 12,
            "count": list(rng.integers(0, 4, 12)) + list(rng.integers(0, 4, 12)),
        }
    )
    rows = []
    for model in ("classifier-fold-1", "classifier-fold-2", "classifier-fold-3"):
        for region in ("mouth", "eye"):
            for name in names + ["UnaffectedSlide1.jpg"]:  # an image without annotations is left out
                rows.append(
                    {
                        "image_name": name,
                        "model": model,
                        "method": "LayerGradCam",
                        "region": region,
                        "score": float(rng.random()),
                    }
                )
    scores = pl.DataFrame(rows)
    result = hpo_correlation(scores, counts)
    assert len(result.per_model) == 6
    for row in result.per_model.iter_rows(named=True):
        joined = scores.filter((pl.col("model") == row["model"]) & (pl.col("region") == row["region"])).join(
            counts, on=["image_name", "region"]
        )
        expected = stats.spearmanr(joined["score"], joined["count"])
        assert row["n"] == 12
        assert row["rho"] == pytest.approx(expected.statistic, rel=1e-12)
        assert row["p"] == pytest.approx(expected.pvalue, rel=1e-12)
    for row in result.summary.iter_rows(named=True):
        rhos = result.per_model.filter(pl.col("region") == row["region"])["rho"].to_numpy()
        assert row["rho_mean"] == pytest.approx(rhos.mean()) and row["n_models"] == 3
        assert row["rho_std"] == pytest.approx(rhos.std(ddof=1))
    wide = table4_wide(result.summary)
    assert wide.columns == ["method", "mouth", "eye"]
    mouth = result.summary.filter(pl.col("region") == "mouth").row(0, named=True)
    assert wide["mouth"][0] == f"{mouth['rho_mean']:.3f} ({mouth['rho_std']:.3f})"


def test_hpo_correlation_with_one_model_and_degenerate_inputs():
    counts = pl.DataFrame({"image_name": ["a", "b", "c", "d"], "region": ["nose"] * 4, "count": [0, 0, 0, 0]})
    scores = pl.DataFrame(
        {
            "image_name": ["a", "b", "c", "d"],
            "model": ["m"] * 4,
            "method": ["Gradient"] * 4,
            "region": ["nose"] * 4,
            "score": [0.1, 0.2, float("nan"), 0.4],
        }
    )
    result = hpo_correlation(scores, counts)
    row = result.per_model.row(0, named=True)
    assert row["n"] == 3 and math.isnan(row["rho"]) and row["note"] == "constant HPO counts"
    summary = result.summary.row(0, named=True)
    assert summary["n_models"] == 0 and math.isnan(summary["rho_mean"]) and math.isnan(summary["rho_std"])
    assert table4_wide(result.summary)["nose"][0] == "n/a"
    one = hpo_correlation(scores, counts.with_columns(count=pl.Series([1, 0, 2, 3])))
    assert one.summary["n_models"][0] == 1 and math.isnan(one.summary["rho_std"][0])  # one model: no spread
    assert table4_wide(one.summary)["nose"][0] == f"{one.summary['rho_mean'][0]:.3f}"
    with pytest.raises(UserFacingError, match="no image × region"):
        hpo_correlation(scores, counts.with_columns(image_name=pl.lit("z")))


def test_cli_rq1_writes_and_prints_table_3(tmp_path, capsys):
    path = tmp_path / "scores-val.parquet"
    _random_study(seed=7).write_parquet(path)
    assert main(["rq1", str(path), "--alpha", "0.01", "--out", str(tmp_path / "out")]) == 0
    table3 = pl.read_csv(tmp_path / "out" / "rq1-table3.csv")
    expected = significance_counts(compare_groups(_random_study(seed=7), alpha=0.01))
    assert table3.equals(expected)
    assert len(pl.read_csv(tmp_path / "out" / "rq1-tests.csv")) == 18
    assert "Table 3" in capsys.readouterr().out
    assert main(["rq1", str(tmp_path / "missing.parquet")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["rq1", str(path), "--reference", "Healthy"]) == 2


def test_in_domain_drops_flagged_faces_and_keeps_faces_without_a_verdict():
    """Issue 14: a planted table of 4 faces × 2 regions: one flagged, one unjudged (model without a guard)."""
    table = pl.DataFrame(
        {
            "image_name": ["a", "a", "b", "b", "c", "c", "d", "d"],
            "model": ["m"] * 6 + ["other"] * 2,
            "region": ["eye", "nose"] * 4,
            "out_of_domain": [False, False, True, True, False, False, None, None],
        }
    )
    kept = in_domain(table)
    assert sorted(set(kept["image_name"])) == ["a", "c", "d"] and len(kept) == 6
    assert domain_counts(table) == (1, 3)
    old = table.drop("out_of_domain")  # a table from before guards: nothing to exclude on
    assert in_domain(old).equals(old) and domain_counts(old) == (0, 0)


def test_cli_rq1_can_exclude_out_of_domain_faces(tmp_path, capsys):
    study = _random_study(seed=7)
    names = sorted(set(study["image_name"]))
    flagged = set(names[::7])  # a planted tenth or so of the faces
    study = study.with_columns(out_of_domain=pl.col("image_name").is_in(list(flagged)))
    path = tmp_path / "scores-val.parquet"
    study.write_parquet(path)
    assert main(["rq1", str(path), "--alpha", "0.01", "--out", str(tmp_path / "out"), "--exclude-out-of-domain"]) == 0
    kept = study.filter(~pl.col("image_name").is_in(list(flagged)))
    expected = compare_groups(kept, alpha=0.01)
    tests = pl.read_csv(tmp_path / "out" / "rq1-tests.csv")
    assert tests["n_syndrome"].to_list() == expected["n_syndrome"].to_list()
    assert tests["n_reference"].to_list() == expected["n_reference"].to_list()
    assert f"{len(flagged)} of {len(names)} faces out of domain" in capsys.readouterr().err


def test_a_warning_is_due_only_past_five_percent_flagged():
    from core.stats import many_out_of_domain

    assert not many_out_of_domain(5, 100)  # the guard flags ~1% by design; 5% is still unremarkable
    assert many_out_of_domain(6, 100)
    assert not many_out_of_domain(0, 0)
