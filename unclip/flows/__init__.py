"""Prefect flows: each reads like a table of contents of its stage."""
