"""``orthoedit export``: an edited checkpoint in the formats other runtimes load.

``gguf``: GGUF files for llama.cpp and the runtimes built on it, written by llama.cpp's own
converter and quantizer (``llama_cpp``), into a folder that ``push`` uploads beside the
safetensors and lists in the card (docs/design.md, "GGUF export").
"""
