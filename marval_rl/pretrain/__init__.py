"""``marval-rl pretrain``: train the embedded default's models from scratch (VAE, MAR teacher, evaluators)."""
