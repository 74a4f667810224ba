"""The RL system: samples, algorithms, the loop (rlfoundry rl) and the demo."""
