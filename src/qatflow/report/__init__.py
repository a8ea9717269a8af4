"""Comparison report: Markdown with plot files, and one self-contained HTML page."""

from qatflow.report.write import ReportFiles, rewrite_report, write_report

__all__ = ["ReportFiles", "rewrite_report", "write_report"]
