"""The adapter family: skill-LoRA layers, routers, hypernetworks and their injection into a base model."""
