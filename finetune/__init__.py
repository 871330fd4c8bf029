"""The fine-tuning program (``gfm finetune``, ``torchrun -m finetune``) and its configs, over :mod:`gfm.finetune`."""
