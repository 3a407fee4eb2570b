"""``python -m lightning_rlhf.serve``: the ``lightning-rlhf-serve-reward`` command."""

from lightning_rlhf.serve.command import main

main()
