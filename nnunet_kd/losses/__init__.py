"""Pure-torch distillation losses, one file per method. No nnU-Net import here: these are tested on tensors."""
