"""RL post-training of a one-step MARVAL policy: rollouts, rewards, reward- and policy-gradient updates."""
