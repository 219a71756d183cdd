"""kullm: instruction-tune Korean LLMs the KULLM (구름) way — Hydra configs, Lightning training, PEFT LoRA."""

__version__ = "0.1.0"
