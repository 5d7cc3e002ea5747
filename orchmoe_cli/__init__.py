"""orchmoe: multi-task parameter-efficient fine-tuning with modular LoRA skills."""

__version__ = "0.1.0"
