"""Alembic migrations for segq's tables; applied with ``segq db upgrade``."""
