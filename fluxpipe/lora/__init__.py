"""LoRA files (kohya, PEFT/diffusers layouts), the trainable LoRA network, and the LoRA tools' maths.

``fluxpipe.lora.apply_lora`` is the public import path of the kohya-layout merge (``fluxpipe.lora.files``)."""

from fluxpipe.lora.files import apply_lora

__all__ = ["apply_lora"]
