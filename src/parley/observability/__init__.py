"""Observability: structured logs, metrics, SLOs and error-pattern diagnosis."""
