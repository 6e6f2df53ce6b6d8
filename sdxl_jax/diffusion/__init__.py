"""Diffusion math as pure functions of arrays: schedules, denoiser scalings, losses, samplers."""
