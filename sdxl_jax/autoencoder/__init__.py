"""Autoencoder training (issue 9): trainer.py (config.task="autoencoder" in train_lib), losses.py (pure loss
functions), discriminator.py (PatchGAN), preview.py (reconstructions), export.py (EMA VAE -> safetensors),
lpips.py (VGG16 LPIPS with weights from a user-supplied safetensors file)."""
