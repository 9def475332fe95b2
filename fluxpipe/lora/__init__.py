"""LoRA files (kohya, PEFT/diffusers layouts), the trainable LoRA network, and the LoRA tools' maths."""
