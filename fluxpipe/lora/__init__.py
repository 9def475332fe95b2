"""LoRA files (kohya, PEFT/diffusers layouts), the trainable LoRA network, and the LoRA tools' maths."""

from fluxpipe.lora.files import apply_lora

__all__ = ["apply_lora"]
