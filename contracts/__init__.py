"""The shared vocabulary of doai: every message, subject and the workflow DSL.

Services depend on this package; it depends on nothing but msgspec.
"""
