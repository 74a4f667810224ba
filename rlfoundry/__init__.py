"""rlfoundry: GLM-4.5-style Mixture-of-Experts models and their reinforcement-learning post-training."""

__version__ = "0.1.0"
