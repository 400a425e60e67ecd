"""The meta-learner and its trainer (issue: compiled MAML meta-step)."""
