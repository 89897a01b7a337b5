"""Language model providers behind one streaming interface: `builtin` (offline, deterministic) and `openai`."""
