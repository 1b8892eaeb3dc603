"""Reporting for normlab's diagnostics: PNG plots (matplotlib, imported only when a plot is
drawn), the console table and a Markdown summary. An edge of the package: it imports the
core, the core never imports it."""

from normlab.report.summary import markdown_summary, table_rows, text_table, write_report

__all__ = ["markdown_summary", "table_rows", "text_table", "write_report"]
