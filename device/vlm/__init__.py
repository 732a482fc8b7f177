"""Model-side integration of visual-token compression (HF VLMs)."""
