"""Plumbing every doai process shares: logging, embedded infrastructure, schema, CLI."""
