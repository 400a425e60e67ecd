"""Meta-reinforcement learning (MAML-RL)."""
