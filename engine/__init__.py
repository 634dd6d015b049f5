"""Adversarial-training engine: data -> step (model, attack, method, soft labels) -> trainer -> writers."""
