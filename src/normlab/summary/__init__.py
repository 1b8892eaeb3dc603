"""What a diagnosis looks like to a person: the console table, ``summary.md`` and PNG plots.

``write_summary(normlab.diagnostics.diagnose(model, batch), out_dir)`` writes
``diagnostics.json``, ``summary.md`` and the figures (matplotlib, the ``plot`` extra, imported
only when a plot is drawn). An edge of the package: it imports the core, the core never imports
it. (A *report* in normlab is a study's ``report.md``: :mod:`normlab.studies`.)
"""

from normlab.summary.text import markdown_summary, table_rows, text_table, write_summary

__all__ = ["markdown_summary", "table_rows", "text_table", "write_summary"]
