"""Run-directory readers and the self-contained HTML report."""

from tracerl.report.html import write_report

__all__ = ["write_report"]
