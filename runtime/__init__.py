"""The library every doai process shares: logging, asyncio helpers, NATS connections and streams, PostgreSQL.

A leaf layer: it imports `contracts` and third-party packages, never a
service or the `doai` composition root.
"""
