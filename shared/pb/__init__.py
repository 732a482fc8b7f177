"""Generated protobuf/gRPC code (committed; regenerate with protos/generate.py)."""
