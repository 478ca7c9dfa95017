"""Test harness: the ComfyUI host, tiny real-architecture fixtures, prompt graphs and the runner."""
