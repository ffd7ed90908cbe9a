"""Reinforcement learning: PPO for VLMs (actor and critic in the training layout, rollouts,
GAE, losses, rewards) and PaCoRe test-time scaling."""
