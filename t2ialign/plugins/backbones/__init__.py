"""Built-in backbone adapters (Stable Diffusion 1.x/2.x and the toy model, SDXL, SD3/3.5)."""
