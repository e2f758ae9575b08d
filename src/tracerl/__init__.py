"""tracerl: RL of LLM agents with verifiable rewards and tree-structured rollouts."""

__version__ = "0.1.0"
