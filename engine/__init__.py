"""Adversarial-training engine: data -> step (model, attack, method, soft labels) -> epoch loop (engine.train)
-> writers."""
