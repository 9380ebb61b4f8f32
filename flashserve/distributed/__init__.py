"""Running Workers in other processes over torch.distributed (gloo on CPU)."""
