"""The node agent: runs one workflow per device through the vendor program, 20 devices at a time."""
