"""Reinforcement learning: rollouts, PPO, rewards, PaCoRe."""
