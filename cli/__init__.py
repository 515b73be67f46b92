"""The ``align`` command line (``cli.main``), above the core, the tasks, the flows and the deployments."""
