"""Persistence: the database engine and sessions, the ORM models, migrations and the start-up schema check."""
