"""Deprecated: ``normlab.report`` is now :mod:`normlab.summary`, and its ``write_report`` is
:func:`normlab.summary.write_summary` ("report" names a study's report only). This module goes
in the next release."""

import warnings

from normlab.summary import markdown_summary, table_rows, text_table, write_summary

warnings.warn(
    "normlab.report is now normlab.summary (write_report is write_summary); "
    "the old module goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)

write_report = write_summary

__all__ = ["markdown_summary", "table_rows", "text_table", "write_report", "write_summary"]
