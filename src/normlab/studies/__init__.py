"""Studies: each reproduces seed papers' headline claims on real data, with verdicts and a report.

A study is one file here that calls :func:`register_study`, plus one name in the import below.
``normlab study list`` shows them; ``normlab study NAME`` runs one; ``normlab report DIR``
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
    Rule,
    RunSpec,
    Side,
    Similar,
    Stats,
    Study,
    StudyOptions,
    get_study,
    grid,
    list_studies,
    register_study,
)
from normlab.studies.report import claims_markdown, claims_text, collect, write_report
from normlab.studies.runner import run_study

__all__ = [
    "STUDIES",
    "Better",
    "Claim",
    "Exceeds",
    "PlotSpec",
    "Rule",
    "RunSpec",
    "Side",
    "Similar",
    "Stats",
    "Study",
    "StudyOptions",
    "claims_markdown",
    "claims_text",
    "collect",
    "get_study",
    "grid",
    "list_studies",
    "register_study",
    "run_study",
    "write_report",
]
