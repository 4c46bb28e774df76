"""The training loop: Trainer, its checkpoint policies, the resumable sampler."""
