"""Run the pipeline on this machine (``local_run``, ``local_docker``, ``progress``, with the
presets in ``profiles``) or compile it for a cluster (``compile``)."""
