"""Hugging Face export/import (`complexity-dist convert to-hf | from-hf`); docs/architecture.md has the key names."""
