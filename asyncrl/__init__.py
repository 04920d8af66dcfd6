"""asyncrl: asynchronous RL post-training for LLMs on Ray.

Importing this package pulls in neither torch nor ray; components import their stacks lazily.
"""

__version__ = "0.1.0"
