"""Prefect tasks: small, typed, idempotent units over shards that return where they wrote."""
