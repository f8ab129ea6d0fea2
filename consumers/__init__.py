"""The task handlers mlpipe ships: one package per workload, registered by ``build_registry``.

``mlpipe consume`` loads ``consumers:build_registry`` unless ``--handlers`` names another
factory, so a team can run its own handlers on the same daemon. A task type with no handler
registered is dead-lettered with reason ``no_handler`` (and the daemon warns at start-up).
"""

from __future__ import annotations

from mlpipe.handlers import Registry
from mlpipe.settings import Settings


def build_registry(settings: Settings) -> Registry:
    """Every shipped handler, and the video workflow that chains them. Heavy resources
    (models, API clients) are registered lazily: a worker that never sees a task type never
    loads its model."""
    from consumers import embed, summarize, transcribe
    from mlpipe.workflow.video import VideoWorkflow

    registry = Registry()
    transcribe.register(registry, settings)
    summarize.register(registry, settings)
    embed.register(registry, settings)
    registry.add_workflow(VideoWorkflow(settings.workflow_timeout_s))
    return registry
