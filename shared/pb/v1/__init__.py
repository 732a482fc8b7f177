"""cdca.v1 wire contract (generated)."""
