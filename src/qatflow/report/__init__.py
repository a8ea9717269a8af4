"""Comparison report: Markdown with plot files, and one self-contained HTML page."""

from qatflow.report.write import ReportFiles, write_report

__all__ = ["ReportFiles", "write_report"]
