"""The HTTP edge: middleware, the error envelope, and the typed dependencies every route receives."""
