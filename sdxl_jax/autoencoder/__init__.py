"""Autoencoder training pieces (issue 9): losses.py (pure loss functions), discriminator.py (PatchGAN),
lpips.py (VGG16 LPIPS with weights from a user-supplied safetensors file)."""
