"""The mapping tables, data only: per architecture, HF parameter name template -> rule naming the tensor in
another layout (:mod:`~ipcbridge.mapping.spec` defines the rules).

:mod:`~ipcbridge.mapping.tables.vllm` holds vLLM 0.25.1's layouts, :mod:`~ipcbridge.mapping.tables.meta` the
Meta / torchtitan one; :mod:`~ipcbridge.mapping.registry` serves them by layout. A table module imports
only :mod:`~ipcbridge.mapping.spec`: adding an architecture is adding data, with its sources noted.
"""
