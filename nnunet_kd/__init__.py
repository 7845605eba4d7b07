"""nnunet-kd: knowledge distillation from frozen nnU-Net v2 teachers into small nnU-Net students."""
__version__ = "0.1.0"
