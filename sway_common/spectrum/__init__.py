"""Weight-space spectra of a LoRA adapter against its base model: numpy only, no forward."""
