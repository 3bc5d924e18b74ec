"""The aggregator: folds node events from JetStream into PostgreSQL run state."""
