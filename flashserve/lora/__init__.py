"""Multi-LoRA serving: adapters loaded from PEFT directories (adapter.py), applied to the model's
linear layers by a LinearMethod wrapper (layers.py), several adapters in one batch, each token
using its request's adapter."""
