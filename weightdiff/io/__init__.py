"""Checkpoint readers and writers: files in, named tensors out (reads no other stage)."""
