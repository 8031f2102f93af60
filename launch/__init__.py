"""Entry points: `launch/train.py`, the Tinker server, Cloud TPU queued resources (`python -m launch.tpu`),
the GPU-side vLLM script for disaggregated runs and the Colab demo notebook."""
