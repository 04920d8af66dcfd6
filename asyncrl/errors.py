"""asyncrl's error hierarchy. Every user-facing error names the field or thing and the fix."""


class AsyncrlError(Exception):
    """Base class; the CLI prints these without a traceback (exit code 2) unless --debug."""


class ConfigError(AsyncrlError):
    """A job config (or an override) is invalid."""


class PluginError(AsyncrlError):
    """A registry name or `module:function` path cannot be resolved."""


class WorkerLost(AsyncrlError):
    """A peer actor died; its in-flight work must be re-queued."""


class TrainerLost(AsyncrlError):
    """The trainer actor died; the job restarts from its newest checkpoint."""
