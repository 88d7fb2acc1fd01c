"""Driving policies: the Agent protocol, the privileged expert, baselines, and LLM agents."""
