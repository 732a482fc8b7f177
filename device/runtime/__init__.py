"""The device's model runtime: compressed student loading, adapter swaps, compressed inference."""
