"""Tools agents can call: a registry of tools with pydantic parameter models, and the per-run dispatcher."""
