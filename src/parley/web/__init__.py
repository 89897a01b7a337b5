"""The small web client: static files served at `/` (sign in, threads, a live conversation)."""
