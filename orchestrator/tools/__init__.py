"""Tools around the project, not part of a sweep: nothing in the runtime package imports them
(a test checks). `python -m orchestrator.tools.wheelhouse`: the offline wheelhouse."""
