"""Studies: each reproduces seed papers' headline claims on real data, with verdicts and a report.

A study is one file here that calls :func:`register_study`, plus one name in the import below.
``normlab study list`` shows them; ``normlab study NAME`` runs one; ``normlab study FILE.toml``
(or ``.py``) runs the user's own (:mod:`normlab.studies.userfile`); ``normlab report DIR``
rewrites a report.
"""

# each import registers one study
from normlab.studies import (  # noqa: F401
    batchless,
    depth,
    dyt,
    groupsize,
    quick,
    small_batch,
    warmup,
)
from normlab.studies.framework import (
    STUDIES,
    Better,
    Claim,
    Exceeds,
    PlotSpec,
    Rate,
    Rule,
    RunSpec,
    Side,
    Similar,
    Size,
    Stats,
    Study,
    StudyOptions,
    get_study,
    grid,
    list_studies,
    register_study,
)
from normlab.studies.report import (
    claims_markdown,
    claims_text,
    collect,
    ranking_markdown,
    ranking_text,
    write_report,
)
from normlab.studies.runner import run_study
from normlab.studies.userfile import StudyFileError, load_study_file, study_from_dict

__all__ = [
    "STUDIES",
    "Better",
    "Claim",
    "Exceeds",
    "PlotSpec",
    "Rate",
    "Rule",
    "RunSpec",
    "Side",
    "Similar",
    "Size",
    "Stats",
    "Study",
    "StudyFileError",
    "StudyOptions",
    "claims_markdown",
    "claims_text",
    "collect",
    "get_study",
    "grid",
    "list_studies",
    "load_study_file",
    "ranking_markdown",
    "ranking_text",
    "register_study",
    "run_study",
    "study_from_dict",
    "write_report",
]
