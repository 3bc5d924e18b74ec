"""doai's composition root: the `doai` command, `doai up` and the development-only embedded servers.

This is the top layer. It may import every service; nothing imports it
(the import-linter contracts in pyproject.toml enforce the direction):

    doai  ->  services.{backend,node,aggregator,simulator}  ->  runtime  ->  contracts
"""
