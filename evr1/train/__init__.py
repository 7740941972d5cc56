"""Training: the GRPO objective (``grpo``) and, built on it, the actor update loop."""
