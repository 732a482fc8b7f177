"""Media for the VLMs: procedural QA scenes with camera domains, real-file loading, frame prep."""
