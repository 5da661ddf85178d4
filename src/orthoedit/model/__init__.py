"""A model on disk: where it comes from (source), which tensors write into its residual stream
(architectures), its safetensors layout (checkpoint) and the directions edited out of it
(direction). Imports no torch."""
