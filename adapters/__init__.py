"""adapters: stage 2, gradient-based adaptation (FFT, LoRA, VeRA, BitFit, IA3) on the shared backbones."""
