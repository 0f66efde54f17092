"""The vllm runner: vLLM 0.32's own worker driven by our StepPlans (``runner.VllmRunner``;
the modules are listed in ``runner.py``'s docstring, the design in docs/vllm.md).

Importing this package imports nothing of vLLM's: ``checks`` runs without it, and
``engine.worker.factory`` imports ``runner`` only for ``--runner vllm``.
"""
