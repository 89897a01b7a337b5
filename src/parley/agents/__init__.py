"""Agents and their runs: the per-run execution context, the assistant, the run manager and its routes."""
