"""normlab inside other training frameworks, each an optional import of its own module:

* :mod:`normlab.integrations.hf`: ``NormMonitorCallback`` for the Hugging Face ``Trainer``;
* :mod:`normlab.integrations.lightning`: ``NormMonitorCallback`` for Lightning's ``Trainer``.

Importing this package imports neither framework.
"""
