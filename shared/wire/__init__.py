"""The wire: tensor encoding, chunking, and the one module that touches protobuf types."""
