"""diffusion-studio in the browser: ``python app.py`` (or ``studio app``) on http://127.0.0.1:7860.

Flags as for ``studio app``: ``--host``, ``--port``, ``--model-dir FOLDER`` (repeatable: the folders whose
models the model fields accept) and ``--auth USER:PASS`` (a login, for a host reachable from the network).

The Gradio layout and wiring live in :mod:`studio.app`, inside the package, so that an installed wheel
(``studio app``) has them too; this file is the checkout's launcher.
"""

from studio.app import main

if __name__ == "__main__":
    main()
