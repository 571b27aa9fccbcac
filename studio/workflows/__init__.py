"""What the CLI and the app both run: :mod:`~studio.workflows.restoration` (degrade / restore),
:mod:`~studio.workflows.batch` (restore a folder over several processes), :mod:`~studio.workflows.editing`
(inversion and editing), :mod:`~studio.workflows.personalize` (textual inversion, generation) and
:mod:`~studio.workflows.web` (the Gradio app's logic without Gradio)."""

from studio.workflows.restoration import Degraded, Restored, degrade, degrade_files, restore, restore_files

__all__ = ["Degraded", "Restored", "degrade", "degrade_files", "restore", "restore_files"]
