"""tinydiff: masked diffusion language models (MDLM), SDTT and TCS distillation, in plain PyTorch."""
