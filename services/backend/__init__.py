"""The backend: operator REST API, run creation and the broadcast outbox relay."""
