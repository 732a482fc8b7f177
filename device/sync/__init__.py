"""The device's link to the cloud: gRPC transport and stored credentials."""
