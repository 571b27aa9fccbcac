"""What the CLI and the app both run: :mod:`~studio.workflows.restoration` (degrade / restore),
:mod:`~studio.workflows.batch` (restore a folder over several processes), :mod:`~studio.workflows.editing`
(inversion and editing), :mod:`~studio.workflows.personalize` (textual inversion, generation) and
:mod:`~studio.workflows.web` (the Gradio app's logic without Gradio); the diffusers pipelines of
:mod:`~studio.workflows.pipelines` are exported here too."""

from studio.workflows.restoration import Degraded, Restored, degrade, degrade_files, restore, restore_files

#: diffusers-native pipelines (:mod:`~studio.workflows.pipelines`), imported on first use
PIPELINES = ("PixelRestorationPipeline", "LatentRestorationPipeline", "FlowRestorationPipeline",
             "NewtonInversionPipeline",
             "RestorationPipelineOutput", "InversionPipelineOutput")

__all__ = ["Degraded", "Restored", "degrade", "degrade_files", "restore", "restore_files", *PIPELINES]


def __getattr__(name: str):
    if name in PIPELINES:
        from studio.workflows import pipelines  # lazy: diffusers + transformers take seconds to import

        return getattr(pipelines, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
